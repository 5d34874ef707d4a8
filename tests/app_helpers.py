"""Helpers of tests/test_app*.py: tiny checkpoints on disk and servers (app.py, transformers serve) in subprocesses."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import torch
from conftest import FIXTURES, REPO, perturbed_model, tiny_config

from modeling_nanochat.tokenizer.tokenizer import convert_nanochat_tokenizer, save_tokenizer

TIMEOUT = 120  # seconds for a server to come up (imports are slow on a busy 2-core machine)


def fixture_tokenizer():
    return convert_nanochat_tokenizer(str(FIXTURES / "nanochat_tokenizer"))


def save_checkpoint(model, tokenizer, path) -> str:
    model.save_pretrained(path)
    save_tokenizer(tokenizer, path)
    return str(path)


def tiny_checkpoint(path):
    """(model, tokenizer, dir) of conftest's perturbed tiny model with the fixture tokenizer."""
    model, tok = perturbed_model(tiny_config()), fixture_tokenizer()
    return model, tok, save_checkpoint(model, tok, path)


def greedy_reply(model, tok, text: str, max_new_tokens: int, skip_special_tokens: bool = False) -> str:
    """(text, token ids) of the greedy reply to one user message, through transformers' generate and the
    checkpoint's chat template: independent of the app's own rendering, tool loop and streaming decoder."""
    prompt = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                     return_dict=True, return_tensors="pt")
    stops = [tok.convert_tokens_to_ids("<|assistant_end|>"), tok.convert_tokens_to_ids("<|bos|>")]
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                             pad_token_id=stops[1])
    new = out[0, prompt["input_ids"].shape[1]:].tolist()
    if new and new[-1] in stops:
        new = new[:-1]
    return tok.decode(new, skip_special_tokens=skip_special_tokens), new


def server_env(**extra) -> dict:
    """This environment without a user's app settings (they would override what a test starts)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NANOCHAT_")}
    env.update(GRADIO_ANALYTICS_ENABLED="False", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A subprocess serving HTTP on 127.0.0.1:port; its output goes to a log file shown when it fails."""

    def __init__(self, args: list[str], log_path, env: dict | None = None, ready_path: str = "/", cwd=REPO,
                 timeout: float = TIMEOUT):
        self.timeout = timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ready_path = ready_path
        self.log_path = str(log_path)
        args = [a.replace("{port}", str(self.port)) for a in args]
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, *args], cwd=cwd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=env if env is not None else server_env())

    def wait(self) -> "Server":
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                urllib.request.urlopen(self.url + self.ready_path, timeout=2)
                return self
            except OSError:
                time.sleep(0.25)
        raise TimeoutError(f"{self.url} not up after {self.timeout} s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        with open(self.log_path) as f:
            return f.read()[-5000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
