"""app.py on loopback: exact streamed greedy replies through gradio_client, calculator calls shown as blocks, the
endpoint mode against a real `transformers serve` of the same checkpoint, 20 users at once, and the input limits."""

import json
import os
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
from app_helpers import Server, fixture_tokenizer, greedy_reply, server_env, tiny_checkpoint
from gradio_client import Client
from gradio_client.exceptions import AppError

import app
from modeling_nanochat.apps import chat_backend as cb
from modeling_nanochat.generation.calculator import use_calculator
from modeling_nanochat.tokenizer.chat_format import render_prompt
from modeling_nanochat.generation.tool_use import generate_batch

PROMPT, MAX_TOKENS = "hello", 24


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """The app on a tiny checkpoint, `transformers serve` on the same checkpoint, and the app in endpoint mode
    talking to that server, all started at once (their imports overlap)."""
    d = tmp_path_factory.mktemp("app")
    model, tok, ckpt = tiny_checkpoint(d / "ckpt")
    started = []
    try:
        local = Server(["app.py", "--model", ckpt, "--port", "{port}"], d / "app.log")
        started.append(local)
        serve = Server(["-m", "modeling_nanochat.apps.serve", ckpt, "--host", "127.0.0.1", "--port", "{port}",
                        "--device", "cpu"], d / "serve.log", ready_path="/health")
        started.append(serve)
        # HF_HUB_OFFLINE=1 (CI) makes huggingface_hub refuse every request, loopback included: not for this one
        env = {k: v for k, v in server_env().items() if k != "HF_HUB_OFFLINE"}
        endpoint = Server(["app.py", "--endpoint", serve.url, "--endpoint-model", ckpt, "--port", "{port}"],
                          d / "endpoint.log", env=env)
        started.append(endpoint)
        for s in started:
            s.wait()
        yield SimpleNamespace(model=model, tok=tok, ckpt=ckpt, local=local, serve=serve, endpoint=endpoint)
    finally:
        for s in started:
            s.stop()


def _text(update):
    """The reply text of one /chat update (a list of assistant messages, or "" before the first token)."""
    return "".join(m["content"] for m in update) if update else ""


@pytest.mark.slow
def test_streams_the_exact_greedy_reply(servers):
    expected, ids = greedy_reply(servers.model, servers.tok, PROMPT, MAX_TOKENS)
    tool_tokens = {servers.tok.convert_tokens_to_ids(t) for t in ("<|python_start|>", "<|output_start|>")}
    assert ids and not tool_tokens & set(ids), "precondition: the tiny model's greedy reply is plain text"

    job = Client(servers.local.url, verbose=False).submit(PROMPT, 0.0, 0, MAX_TOKENS, api_name="/chat")
    final = job.result()
    streamed = [_text(u) for u in job.outputs()]
    assert final == [{"role": "assistant", "content": expected}]
    assert len(set(streamed)) > 2, f"the reply did not stream: {streamed}"
    assert all(expected.startswith(s) for s in streamed)  # growing prefixes, never a wrong intermediate text


@pytest.mark.slow
def test_endpoint_mode_chats_with_transformers_serve(servers):
    # the server decodes with special tokens skipped; this reply has none, so it equals the local one too
    expected, _ = greedy_reply(servers.model, servers.tok, PROMPT, MAX_TOKENS, skip_special_tokens=True)
    job = Client(servers.endpoint.url, verbose=False).submit(PROMPT, 0.0, 0, MAX_TOKENS, api_name="/chat")
    assert job.result() == [{"role": "assistant", "content": expected}]
    assert len({_text(u) for u in job.outputs()}) > 2, "the endpoint reply did not stream"
    with urllib.request.urlopen(servers.endpoint.url + "/config") as r:
        assert "calculator calls are not executed" in json.dumps(json.load(r))


@pytest.mark.slow
def test_twenty_users_at_once(servers):
    prompts = [f"hello {i}" for i in range(20)]
    expected = [[{"role": "assistant", "content": greedy_reply(servers.model, servers.tok, p, 8)[0]}]
                for p in prompts]

    def chat(prompt):
        return Client(servers.local.url, verbose=False).predict(prompt, 0.0, 0, 8, api_name="/chat")

    with ThreadPoolExecutor(len(prompts)) as pool:
        assert list(pool.map(chat, prompts)) == expected  # all complete, each with its own answer


@pytest.mark.parametrize("args, error", [
    (("x" * (cb.MAX_MESSAGE_CHARS + 1), 0.0, 0, 8), "Message 1 is too long (8,001 characters): at most 8,000"),
    (("hi", 2.5, 0, 8), "Temperature must be between 0.0 and 2.0, got 2.5"),
    (("hi", 0.0, 201, 8), "Top-k must be between 0 and 200, got 201"),
    (("hi", 0.0, 0, 5000), "Max tokens must be between 1 and 4096, got 5000"),
    (("", 0.0, 0, 8), "Message 1 is empty"),
    (("hello " * 300, 0.0, 0, 8), "fills the model's context of 256 tokens; clear the chat"),
], ids=["message-too-long", "temperature", "top-k", "max-tokens", "empty", "context"])
@pytest.mark.slow
def test_oversized_inputs_get_readable_errors(servers, args, error):
    with pytest.raises(AppError) as e:
        Client(servers.local.url, verbose=False).predict(*args, api_name="/chat")
    assert error in str(e.value)


@pytest.fixture(scope="module")
def tok():
    return fixture_tokenizer()


def _respond(backend, message, history, temperature=0.0, top_k=0, max_tokens=30):
    return list(app.build_demo(backend, description="").fn(message, history, temperature, top_k, max_tokens))


def test_history_limits(tok):
    # The /chat API keeps the history server-side per session, so clients cannot send 501 messages at once; the
    # chat function gets the history Gradio holds and checks it (nanochat's limits: 500 messages, 32,000 chars).
    import gradio as gr

    backend = SimpleNamespace(stream=lambda *a: pytest.fail("the model must not run on a refused request"))
    turn = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}, {"role": "assistant", "content": "ok"}]
    with pytest.raises(gr.Error, match=r"Too many messages \(501\): at most 500"):
        _respond(backend, "hi", turn * 250)
    long = [{"role": "user", "content": "y" * 7000}, {"role": "assistant", "content": "z" * 7000}]
    with pytest.raises(gr.Error, match=r"conversation is too long \(35,000 characters\): at most 32,000"):
        _respond(backend, "y" * 7000, long * 2)


def test_history_from_gradio():
    text = lambda t: [{"type": "text", "text": t}]  # noqa: E731 - how Gradio 6 hands history content
    history = [
        {"role": "assistant", "content": text("Hi! Ask me anything.")},  # a greeting answers nothing: left out
        {"role": "user", "content": text("x" * 9000)},  # refused (too long), so never answered: left out
        {"role": "user", "content": text("what is 2+3?")},
        {"role": "assistant", "content": text("Let me compute.")},
        {"role": "assistant", "content": text("```\n2+3\n```\n\n= 5"), "metadata": {"title": cb.TOOL_TITLE}},
        {"role": "assistant", "content": "It is 5."},
    ]
    assert cb.history_to_conversation("thanks", history) == [
        {"role": "user", "content": "what is 2+3?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Let me compute."},
                                          {"type": "python", "text": "2+3"}, {"type": "python_output", "text": "5"},
                                          {"type": "text", "text": "It is 5."}]},
        {"role": "user", "content": "thanks"},
    ]
    with pytest.raises(cb.InputError, match="Only text messages"):
        cb.history_to_conversation("hi", [{"role": "user", "content": [{"path": "cat.png"}]}])


def test_calculator_call_shows_as_a_block(tok):
    from test_tool_generation import _nanochat, wired_model  # a model wired to call the calculator with "2+3"

    model, _ = wired_model(_nanochat, tok, "2+3")
    updates = _respond(cb.LocalChat(model, tok), "what is 2 + 3?", [])
    block = {"role": "assistant", "content": f"```\n2+3\n```\n\n= {use_calculator('2+3')}",
             "metadata": {"title": cb.TOOL_TITLE}}
    assert updates[-1] == [block]
    assert any(u and u[0]["metadata"]["status"] == "pending" for u in updates[:-1])  # shown while it runs

    # the next turn renders exactly the tokens the model produced (the call and its output as special spans)
    history = [{"role": "user", "content": [{"type": "text", "text": "what is 2 + 3?"}]}, block]
    conversation = cb.history_to_conversation("thanks", history)
    prompt = render_prompt(tok, {"messages": conversation[:1]})
    (produced,), _ = generate_batch(model, tok, prompt, max_tokens=30, temperature=0.0)
    assert render_prompt(tok, {"messages": conversation})[:len(produced) + 1] == \
        produced + [tok.convert_tokens_to_ids("<|assistant_end|>")]


def test_default_model_is_the_newest_of_the_last_run(tmp_path, monkeypatch):
    monkeypatch.delenv(cb.MODEL_ENV, raising=False)
    with pytest.raises(SystemExit, match="No model to chat with") as e:
        cb.resolve_model(None, str(tmp_path / "runs"))
    assert "--model" in str(e.value) and cb.MODEL_ENV in str(e.value) and "--endpoint" in str(e.value)

    def make(path, mtime):  # what save_pretrained leaves (contents do not matter to the choice)
        path.mkdir(parents=True)
        for name in ("config.json", "model.safetensors"):
            (path / name).write_text("{}")
        os.utime(path / "config.json", (mtime, mtime))

    runs = tmp_path / "runs"
    make(runs / "d12", 100)  # a finished run: final model at its root
    make(runs / "d12" / "checkpoint-50", 90)
    (runs / "tokenizer").mkdir()  # not a model
    assert cb.resolve_model(None, str(runs)) == str(runs / "d12")
    make(runs / "d20" / "checkpoint-100", 200)  # a newer run, still training
    make(runs / "d20" / "checkpoint-1000", 300)
    make(runs / "d20" / "checkpoint-200", 400)  # written last, but an older step
    assert cb.resolve_model(None, str(runs)) == str(runs / "d20" / "checkpoint-1000")
    monkeypatch.setenv(cb.MODEL_ENV, "someone/nanochat-d20")  # a Space sets this
    assert cb.resolve_model(None, str(runs)) == "someone/nanochat-d20"
    assert cb.resolve_model(str(runs / "d12"), str(runs)) == str(runs / "d12")
