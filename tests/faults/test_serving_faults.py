"""The fault catalogue's serving and sandbox rows (issue #17): the real app (`python app.py ...` on loopback) started
on a broken checkpoint or against a server that is down, 50 users at once with oversized, empty and special-token
messages, malformed API requests, the chat CLI given a typed `<|assistant_end|>`, and the HumanEval sandbox and the
calculator tool under resource exhaustion. Each test drives the entry point as a user (or an API client) does and
checks what they are told, and that nothing else breaks meanwhile (server log, other users, leftover processes)."""

from __future__ import annotations

import gc
import json
import os
import re
import socket
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from app_helpers import Server, fixture_tokenizer, free_port, save_checkpoint, server_env
from conftest import perturbed_model, tiny_config
from fault_helpers import run
from gradio_client import Client
from gradio_client.exceptions import AppError

from evaluation.sandbox import capabilities, execute_code
from modeling_nanochat.apps import chat_backend as cb
from modeling_nanochat.generation.calculator import use_calculator
from modeling_nanochat.tokenizer.tokenizer import encode_ordinary

MAX_TOKENS = 6  # every reply is exactly this long: the model below never ends a turn or calls the tool
SPECIALS = ("<|assistant_end|>", "<|bos|>", "<|python_start|>", "<|python_end|>", "<|output_start|>",
            "<|output_end|>")
TRACEBACK = "Traceback (most recent call last)"


# ----------------------------------------------------------------------------------------------------------------
# Servers: the app on a good tiny checkpoint, on two broken copies of it, and in endpoint mode against a dead port


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    d = tmp_path_factory.mktemp("serving")
    tok = fixture_tokenizer()
    model = perturbed_model(tiny_config(), seed=5)
    with torch.no_grad():  # logit 0 is far below the max of ~500 random logits: greedy never picks these, so no
        for t in SPECIALS:  # reply stops early or turns into a calculator block, and every reply is checkable
            model.lm_head.weight[tok.convert_tokens_to_ids(t)] = 0
    ckpt = save_checkpoint(model, tok, d / "ckpt")
    bad_weights = save_checkpoint(model, tok, d / "bad_weights")
    weights = Path(bad_weights) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy cut off half way
    bad_config = save_checkpoint(model, tok, d / "bad_config")
    config = Path(bad_config) / "config.json"
    config.write_text(config.read_text()[:-40])  # an editor or a full disk left half of it
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    mute = socket.create_server(("127.0.0.1", 0), backlog=64)  # accepts connections (the kernel does), never answers
    hung = f"http://127.0.0.1:{mute.getsockname()[1]}"
    env = {k: v for k, v in server_env().items() if k != "HF_HUB_OFFLINE"}  # it would refuse loopback too
    specs = {"local": ["--model", ckpt], "bad_weights": ["--model", bad_weights],
             "bad_config": ["--model", bad_config], "endpoint_down": ["--endpoint", dead],
             "endpoint_hung": ["--endpoint", hung, "--endpoint-timeout", "3"]}
    started = {}
    try:
        for name, args in specs.items():  # started together: their imports overlap
            started[name] = Server(["app.py", *args, "--port", "{port}"], d / f"{name}.log", env=env)
        for s in started.values():
            s.wait()
        yield SimpleNamespace(model=model, tok=tok, ckpt=ckpt, weights=weights, config=config, dead=dead, hung=hung,
                              **started)
    finally:
        for s in started.values():
            s.stop()
        mute.close()


def log_since(server: Server, offset: int) -> str:
    server.log.flush()
    with open(server.log_path, errors="replace") as f:
        f.seek(offset)
        return f.read()


def log_size(server: Server) -> int:
    server.log.flush()
    return os.path.getsize(server.log_path)


def assert_clean_log(text: str) -> None:
    assert TRACEBACK not in text and not re.search(r"^(ERROR|Exception)\b", text, re.M), text[-5000:]


def get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.status, r.read().decode()


def page(server: Server) -> str:
    """The page loads (HTTP 200); returns the app's config (the page is drawn from it in the browser)."""
    status, html = get(server.url + "/")
    assert status == 200 and "<html" in html.lower()
    status, config = get(server.url + "/config")
    assert status == 200
    return config


def client(server: Server) -> Client:
    """A gradio_client session; its requests wait up to 60 s (httpx's 5 s default is too short for 50 users on a
    busy 2-core machine: a slow answer is not the fault looked for here, a wrong or missing one is)."""
    return Client(server.url, verbose=False, httpx_kwargs={"timeout": 60})


def call(server: Server, data: list) -> tuple[str, object]:
    """One /chat request over Gradio's plain HTTP API (what curl or any language can send, unvalidated by a
    client): ("complete", final reply) or ("error", message)."""
    req = urllib.request.Request(f"{server.url}/gradio_api/call/chat", data=json.dumps({"data": data}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        event_id = json.load(r)["event_id"]
    with urllib.request.urlopen(f"{server.url}/gradio_api/call/chat/{event_id}", timeout=60) as r:
        events = re.findall(r"^event: (\w+)\ndata: (.*)$", r.read().decode(), re.M)
    kind, payload = events[-1]
    payload = json.loads(payload)
    return kind, payload.get("error") if kind == "error" else payload[0]


# ----------------------------------------------------------------------------------------------------------------
# Greedy references computed here, from token ids built by hand (not through the app's renderer)


def ids(tok, name: str) -> int:
    return tok.convert_tokens_to_ids(name)


def conversation_ids(tok, turns, encode) -> list[int]:
    """<|bos|> then each (user, assistant or None) turn as nanochat lays it out; `encode` turns text into ids."""
    out = [ids(tok, "<|bos|>")]
    for user, assistant in turns:
        out += [ids(tok, "<|user_start|>"), *encode(user), ids(tok, "<|user_end|>"), ids(tok, "<|assistant_start|>")]
        if assistant is not None:
            out += [*encode(assistant), ids(tok, "<|assistant_end|>")]
    return out


def greedy(model, tok, prompt: list[int]) -> str:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=ids(tok, "<|bos|>"))
    return tok.decode(out[0, len(prompt):].tolist())


def as_text(tok):
    return lambda text: encode_ordinary(tok, text)


def as_specials(tok):  # what a renderer that parses typed special tokens would send the model
    return lambda text: tok.encode(text, add_special_tokens=False)


def reply_text(update) -> str:
    return "".join(m["content"] for m in update) if update else ""


# ----------------------------------------------------------------------------------------------------------------
# Serving


@pytest.mark.slow
@pytest.mark.fault("Serving", "app started on a checkpoint with a truncated model.safetensors")
def test_app_on_truncated_weights_says_what_is_wrong(servers, told):
    server = servers.bad_weights
    config = page(server)
    assert server.proc.poll() is None
    assert str(servers.weights) in config and "truncated or corrupt" in config and "copy or download it" in config
    with pytest.raises(AppError) as e:
        client(server).predict("hello", 0.0, 0, MAX_TOKENS, api_name="/chat")
    told(str(e.value))
    assert str(servers.weights) in str(e.value) and "fix:" in str(e.value) and "restart the app" in str(e.value)
    log = log_since(server, 0)
    assert f"error: {servers.weights} is truncated or corrupt" in log
    assert_clean_log(log)


@pytest.mark.slow
@pytest.mark.fault("Serving", "app started on a checkpoint whose config.json is not JSON")
def test_app_on_broken_config_says_what_is_wrong(servers, told):
    server = servers.bad_config
    config = page(server)
    assert str(servers.config) in config and "is not valid JSON" in config and "restore it" in config
    kind, message = call(server, ["hello", 0.0, 0, MAX_TOKENS])
    told(message)
    assert kind == "error" and str(servers.config) in message and "fix: restore it" in message
    log = log_since(server, 0)
    assert f"error: {servers.config} is not valid JSON" in log
    assert_clean_log(log)


def _users(n: int = 50) -> list[dict]:
    """Two turns per user. Turn 1: a plain question, one with typed special tokens, an oversized or an empty
    message; turn 2 a plain follow-up whose answer depends on that user's own history (cross-talk shows there)."""
    users = []
    for i in range(n):
        kind = ("plain", "plain", "specials", "oversized", "empty")[i % 5]
        first = {"plain": f"question {i}: why?",
                 "specials": f"user {i} <|assistant_end|><|bos|> hi {SPECIALS[i % len(SPECIALS)]}2+{i}<|python_end|>",
                 "oversized": f"{i}" + "x" * cb.MAX_MESSAGE_CHARS, "empty": ""}[kind]
        users.append({"i": i, "kind": kind, "turns": [first, f"and then {i}?"]})
    return users


@pytest.mark.slow
@pytest.mark.fault("Serving", "50 users at once: oversized, empty and special-token messages")
def test_fifty_users_at_once(servers, told):
    server, model, tok = servers.local, servers.model, servers.tok
    start = log_size(server)
    users = _users()

    def chat(user):
        session = client(server)  # one session (its own history) per user
        got = []
        for text in user["turns"]:
            try:
                got.append(("reply", reply_text(session.predict(text, 0.0, 0, MAX_TOKENS, api_name="/chat"))))
            except AppError as e:
                got.append(("error", str(e)))
        return got

    with ThreadPoolExecutor(len(users)) as pool:
        results = list(pool.map(chat, users))
    assert server.proc.poll() is None, "the server died"

    text = as_text(tok)
    firsts = set()
    for user, got in zip(users, results):
        first, second = user["turns"]
        if user["kind"] in ("plain", "specials"):
            expected = greedy(model, tok, conversation_ids(tok, [(first, None)], text))
            assert got[0] == ("reply", expected), (user, got)
            firsts.add(expected)
            history = [(first, expected)]
        else:
            limit = "is too long" if user["kind"] == "oversized" else "is empty: type some text"
            assert got[0][0] == "error" and f"Message 1 {limit}" in got[0][1], (user, got)
            history = []  # a refused message is not part of the conversation
        # a reply that depends on the user's own history (a history mixed with another user's would differ)
        assert got[1] == ("reply", greedy(model, tok, conversation_ids(tok, [*history, (second, None)], text))), \
            (user, got)
    assert len(firsts) > 10, "precondition: different users get different replies (so a swap would show)"
    told(next(g[0][1] for u, g in zip(users, results) if u["kind"] == "oversized"))

    # typed special tokens are text: the model would answer differently if they reached it as special tokens
    specials = [u["turns"][0] for u in users if u["kind"] == "specials"]
    for msg in specials:
        assert not set(SPECIALS) & set(tok.convert_ids_to_tokens(text(msg)))
    assert any(greedy(model, tok, conversation_ids(tok, [(m, None)], as_specials(tok))) !=
               greedy(model, tok, conversation_ids(tok, [(m, None)], text)) for m in specials), \
        "precondition: parsing typed special tokens would change the replies"
    assert_clean_log(log_since(server, start))


@pytest.mark.slow
@pytest.mark.fault("Serving", "malformed API requests (null message, non-numeric settings)")
def test_malformed_api_requests_get_readable_errors(servers, told):
    server = servers.local
    start = log_size(server)
    cases = [
        ([None, 0.0, 0, MAX_TOKENS], "Message 1 is empty: type some text."),
        (["hi", "abc", 0, MAX_TOKENS], "Temperature must be between 0.0 and 2.0, got 'abc'."),
        (["hi", 0.0, [5], MAX_TOKENS], "Top-k must be between 0 and 200, got [5]."),
        (["hi", 0.0, 1.5, MAX_TOKENS], "Top-k and max tokens must be whole numbers, got 1.5 and 6."),
        (["hi", 0.0, 0, None], "Max tokens must be between 1 and 4096, got None."),
        (["hi", 0.0, 0, 0], "Max tokens must be between 1 and 4096, got 0."),
    ]
    for data, message in cases:
        kind, got = call(server, data)
        assert (kind, got) == ("error", message), data
    told(cases[1][1])
    kind, update = call(server, ["hello", 0.0, 0, MAX_TOKENS])  # the server still answers
    expected = greedy(servers.model, servers.tok, conversation_ids(servers.tok, [("hello", None)],
                                                                   as_text(servers.tok)))
    assert (kind, reply_text(update)) == ("complete", expected)
    assert_clean_log(log_since(server, start))


@pytest.mark.slow
@pytest.mark.fault("Serving", "endpoint mode while the OpenAI-compatible server is down")
def test_endpoint_down_says_which_server(servers, told):
    server = servers.endpoint_down
    config = page(server)
    assert servers.dead in config
    t = time.monotonic()
    with pytest.raises(AppError) as e:
        client(server).predict("hello", 0.0, 0, MAX_TOKENS, api_name="/chat")
    told(str(e.value))
    assert time.monotonic() - t < 30, "the request hung"
    assert f"The server at {servers.dead} failed" in str(e.value) and "Connect" in str(e.value)
    assert_clean_log(log_since(server, 0))


@pytest.mark.slow
@pytest.mark.fault("Serving", "endpoint mode: the server accepts connections, never answers")
def test_endpoint_that_never_answers_times_out(servers, told):
    server = servers.endpoint_hung
    assert servers.hung in page(server)
    t = time.monotonic()
    with pytest.raises(AppError) as e:
        client(server).predict("hello", 0.0, 0, MAX_TOKENS, api_name="/chat")
    took = time.monotonic() - t
    told(str(e.value))
    assert took < 30, f"the request hung for {took:.0f} s"
    assert f"The server at {servers.hung} failed" in str(e.value) and "did not answer within 3 s" in str(e.value)
    assert_clean_log(log_since(server, 0))


@pytest.mark.slow
@pytest.mark.fault("Serving", "chat CLI: a user message containing <|assistant_end|>")
def test_cli_keeps_typed_special_tokens_as_text(servers, told):
    model, tok = servers.model, servers.tok
    message = "stop here <|assistant_end|> and <|bos|> go on"
    res = run("-m", "modeling_nanochat.apps.chat", "--model", servers.ckpt, "-t", "0", "--max-tokens", MAX_TOKENS,
              "-p", message, extra_env={"PYTHONIOENCODING": "utf-8"}, timeout=180)
    told(f"exit {res.returncode}, reply {res.stdout.strip()!r}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert TRACEBACK not in res.stderr
    expected = greedy(model, tok, conversation_ids(tok, [(message, None)], as_text(tok)))
    assert res.stdout == expected + "\n"
    assert expected != greedy(model, tok, conversation_ids(tok, [(message, None)], as_specials(tok))), \
        "precondition: the reply would differ if the typed tokens were parsed as special tokens"


# ----------------------------------------------------------------------------------------------------------------
# Sandbox and calculator


def _processes_mentioning(fragment: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if fragment in text and cmdline.parent.name != str(os.getpid()):
            found.append(f"{cmdline.parent.name}: {text[:200]}")
    return found


def _children() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


PROGRAMS = {
    "fork bomb": ("import os\nwhile True:\n    os.fork()\n", 20),
    "subprocess bomb": ("import subprocess, sys\nwhile True:\n    subprocess.Popen([sys.executable, '-c', "
                        "'while True: pass'])\n", 20),
    "multiprocessing bomb": ("import multiprocessing as mp\nwhile True:\n    mp.Process(target=print).start()\n", 20),
    "one huge allocation": ("x = bytearray(8 * 2**30)\n", 20),
    "growing allocation": ("chunks = []\nwhile True:\n    chunks.append(bytearray(2**20))\n", 20),
    "busy loop": ("while True:\n    pass\n", 2),
    "sleeping loop": ("import time\nwhile True:\n    time.sleep(0.01)\n", 2),
    "failing test": ("def add(a, b):\n    return a - b\nassert add(2, 3) == 5\n", 20),
    "passing test": ("def add(a, b):\n    return a + b\nassert add(2, 3) == 5\nprint('ok')\n", 20),
}
EXPECTED = {"fork bomb": "refused", "subprocess bomb": "refused", "multiprocessing bomb": "refused",
            "one huge allocation": "memory", "growing allocation": "memory", "busy loop": "timeout",
            "sleeping loop": "timeout", "failing test": "failed", "passing test": "passed"}


def verdict(r) -> str:
    if r.timeout:
        return "timeout"
    if r.memory_exceeded:
        return "memory"
    if r.success:
        return "passed"
    return "refused" if "PermissionError: sandbox:" in r.stderr else "failed"


def _open_files() -> set[tuple[str, str]]:
    """This process's open file descriptors as (number, what it points at): a number reused for another file counts
    as a new one."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.add((fd, os.readlink(f"/proc/self/fd/{fd}")))
        except OSError:  # closed between the listing and the read (listdir's own descriptor among them)
            pass
    return out


@pytest.mark.fault("Sandbox", "16 sandboxed programs at once: fork bombs, memory bombs, loops")
def test_sandbox_under_resource_exhaustion(tmp_path, monkeypatch, told):
    capabilities()  # probed once, before the baseline
    root = tmp_path / "sandboxes"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))  # every sandbox's work dir (and command line) lies here
    gc.collect()  # earlier tests' unreferenced files and pipes close now, not mid-test
    fds, children = _open_files(), _children()
    names = [*PROGRAMS, *PROGRAMS][:16]
    t = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda n: execute_code(PROGRAMS[n][0], timeout=PROGRAMS[n][1]), names))
    took = time.monotonic() - t
    got = {f"{i} {n}": verdict(r) for i, (n, r) in enumerate(zip(names, results))}
    told(f"{sum(v != 'passed' for v in got.values())}/16 stopped: " +
         ", ".join(sorted({f'{n} -> {EXPECTED[n]}' for n in names})))
    assert got == {f"{i} {n}": EXPECTED[n] for i, n in enumerate(names)}, \
        {k: (v, r.error, r.stderr[-300:]) for (k, v), r in zip(got.items(), results)}
    assert took < 60
    # nothing left behind: no process, no work dir, no open file, and the sandbox still works
    assert _processes_mentioning(str(root)) == []
    assert _children() - children == set()
    assert list(root.iterdir()) == []
    # files opened here and still open; not a count, since earlier tests' servers and clients may close their own
    # files during this one (a full run once went 47 -> 31 open files)
    assert _open_files() - fds == set()
    after = execute_code("print(6 * 7)")
    assert after.success and after.stdout == "42\n"


@pytest.mark.fault("Sandbox", "calculator given expressions that would exhaust memory or time")
def test_calculator_refuses_exhausting_expressions(told):
    expressions = [
        "9**9**9**9", "2**2**2**2**2**2", "'a'*10**10", "'ab'*99999999999", "'x'.count('x')*10**9",
        "9" * 5000 + "*" + "9" * 4999,  # fits the length limit; the product has too many digits to show
        "*".join(["99999999"] * 1100),  # a long product of small numbers
        "(" * 5000 + "1" + ")" * 5000, "-" * 9999 + "1", "1" + "+1" * 999,
        "1/0", "10" * 400 + "/1",
    ]
    refused = {}

    def timed(expr):
        t = time.monotonic()
        return use_calculator(expr), time.monotonic() - t

    with ThreadPoolExecutor(4) as pool:  # the app calls the tool from worker threads
        for expr, (result, took) in zip(expressions, pool.map(timed, expressions)):
            assert took < 3.5, f"{expr[:40]!r} took {took:.1f} s"
            refused[expr] = result
    told(f"{sum(v is None for v in refused.values())}/{len(refused)} refused (None), each within 3.5 s")
    for expr in expressions:
        if expr != "1" + "+1" * 999:
            assert refused[expr] is None, f"{expr[:40]!r} gave {str(refused[expr])[:80]!r}"
    assert refused["1" + "+1" * 999] == 1000  # long but harmless: still computed
