"""ChatCORE, nanochat's chat-model score, on any transformers causal LM with a nanochat tokenizer.

    python -m evaluation.chat --model DIR --task all [--data PATH] [--limit N] [--output FILE.json]
    torchrun --nproc_per_node 2 -m evaluation.chat --model DIR ...   # problems split by rank, results gathered
    python -m evaluation.chat --model DIR --task gsm8k --output a.json --also '--task mmlu --output b.json'
                                      # several sets, one process: the model loaded (and compiled) once

Tasks as nanochat's scripts/chat_eval.py runs them (reference §6.3):

* ARC-Easy, ARC-Challenge, MMLU (categorical): prompts rendered up to ``<|assistant_start|>``, right-padded with
  BOS, one forward per batch of 8; the answer is the argmax of the last position's logits over the allowed letters.
* GSM8K, HumanEval (generative): ``num_samples`` completions per problem with the calculator tool
  (modeling_nanochat.generation.tool_use, nanochat's Engine: greedy by default, 512 new tokens, top-k 50, seed 42);
  a problem passes if any completion does (pass@k). HumanEval programs run in evaluation/sandbox.py.
* ChatCORE = mean over the five tasks of (accuracy - baseline) / (1 - baseline), baseline 0.25 for the
  multiple-choice tasks and 0 for the others; ChatCORE_cat is the same over the three categorical tasks.

``--limit N`` takes the first N problems of nanochat's seed-42 shuffle, as nanochat's ``--max-problems``. Rank r of
W takes batches (categorical) or problems (generative) r, r+W, ... as nanochat does, so every number is the same
on any number of processes.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import os
import shlex
import sys

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from modeling_nanochat.tokenizer.chat_format import render_for_completion
from modeling_nanochat.utils.distributed import rank_world
from modeling_nanochat.utils.dtypes import torch_dtype
from modeling_nanochat.utils.errors import cli_main
from modeling_nanochat.tokenizer.tokenizer import encode_ordinary, special_token_id
from modeling_nanochat.generation import static_decode
from modeling_nanochat.generation.tool_use import generate_batch

from .tasks import ALL_TASKS, TASKS, ChatTask

logger = logging.getLogger(__name__)
CATEGORICAL = ("arc_easy", "arc_challenge", "mmlu")


# ----------------------------------------------------------------------------------------------------------------
# Categorical tasks: letter logits


class LetterIds:
    """Token id of each answer letter; nanochat requires every letter to be a single token."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids = tokenizer, {}

    def __call__(self, letters) -> list[int]:
        for letter in letters:
            if letter not in self.ids:
                ids = encode_ordinary(self.tokenizer, letter)
                if len(ids) != 1:
                    raise ValueError(f"answer letter {letter!r} is {len(ids)} tokens with this tokenizer; "
                                     "categorical scoring needs single-token letters (as nanochat asserts)")
                self.ids[letter] = ids[0]
        return [self.ids[letter] for letter in letters]


@torch.inference_mode()
def predict_letters(model, tokenizer, conversations: list[dict], letter_ids: LetterIds | None = None) -> list[str]:
    """One forward over the batch: each conversation's predicted letter."""
    letter_ids = letter_ids or LetterIds(tokenizer)
    prompts = [render_for_completion(tokenizer, c) for c in conversations]
    bos = special_token_id(tokenizer, "<|bos|>")  # padding after the prompt is never attended to (causal)
    width = max(len(p) for p in prompts)
    device = next(model.parameters()).device
    ids = torch.tensor([p + [bos] * (width - len(p)) for p in prompts], dtype=torch.long, device=device)
    last = [len(p) - 1 for p in prompts]
    kwargs = {"use_cache": False}
    positions = sorted(set(last))
    if "logits_to_keep" in inspect.signature(model.forward).parameters:  # only the answer positions, not (B, T, V)
        kwargs["logits_to_keep"] = torch.tensor(positions, device=device)
        column = {pos: j for j, pos in enumerate(positions)}
    else:
        column = {pos: pos for pos in positions}
    logits = model(input_ids=ids, **kwargs).logits
    out = []
    for row, (conv, pos) in enumerate(zip(conversations, last)):
        scores = logits[row, column[pos], letter_ids(conv["letters"])]
        out.append(conv["letters"][int(scores.argmax())])
    return out


def _categorical(task: ChatTask, model, tokenizer, n: int, batch_size: int, rank: int, world: int, bar) -> list:
    records, letter_ids = [], LetterIds(tokenizer)
    for b in range(rank, math.ceil(n / batch_size), world):
        indices = range(b * batch_size, min((b + 1) * batch_size, n))
        conversations = [task[i] for i in indices]
        for i, conv, letter in zip(indices, conversations, predict_letters(model, tokenizer, conversations,
                                                                           letter_ids)):
            records.append({"index": i, "prediction": letter, "answer": conv["messages"][-1]["content"],
                            "correct": bool(task.evaluate(conv, letter))})
        bar.update(len(indices))
    return records


# ----------------------------------------------------------------------------------------------------------------
# Generative tasks: sampling with the calculator tool


def complete(model, tokenizer, conversation: dict, num_samples: int = 1, max_new_tokens: int = 512,
             temperature: float = 0.0, top_k: int | None = 50) -> list[str]:
    """nanochat's completions of a conversation's last assistant turn: the text after the prompt, tool calls and
    their forced outputs included, the terminal token left out."""
    prompt = render_for_completion(tokenizer, conversation)
    seqs, _ = generate_batch(model, tokenizer, prompt, num_samples=num_samples, max_tokens=max_new_tokens,
                             temperature=temperature, top_k=top_k)
    return [tokenizer.decode(s[len(prompt):], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            for s in seqs]


def _generative(task: ChatTask, model, tokenizer, n: int, rank: int, world: int, bar, **sampling) -> list:
    records = []
    for i in range(rank, n, world):
        conv = task[i]
        completions = complete(model, tokenizer, conv, **sampling)
        outcomes = [bool(task.evaluate(conv, c)) for c in completions]
        records.append({"index": i, "completions": completions, "outcomes": outcomes, "correct": any(outcomes)})
        bar.update(1)
    return records


# ----------------------------------------------------------------------------------------------------------------
# Scores


def centered(accuracy: float, baseline: float) -> float:
    return (accuracy - baseline) / (1.0 - baseline)


def chatcore(results: dict[str, dict], names=tuple(TASKS)) -> float | None:
    """Mean centered accuracy over ``names`` (all five tasks = ChatCORE, CATEGORICAL = ChatCORE_cat); None unless
    every one of them was evaluated, as nanochat reports it only then."""
    if not all(name in results for name in names):
        return None
    return sum(results[name]["centered"] for name in names) / len(names)


def evaluate_task(task: ChatTask, model, tokenizer, limit: int | None = None, batch_size: int = 8,
                  num_samples: int = 1, max_new_tokens: int = 512, temperature: float = 0.0, top_k: int | None = 50,
                  progress: bool = True) -> dict:
    """Accuracy of ``model`` on ``task`` (the first ``limit`` problems). In a distributed run every rank must call
    this; each scores its share and all get the gathered result."""
    rank, world = rank_world()
    n = len(task) if limit is None else min(len(task), limit)
    if n < 1:
        raise ValueError(f"{task.title}: nothing to evaluate (limit={limit}, {len(task)} problems)")
    if task.eval_type == "categorical":  # this rank's problems, for the progress bar
        mine = sum(min(batch_size, n - b * batch_size) for b in range(rank, math.ceil(n / batch_size), world))
    else:
        mine = len(range(rank, n, world))
    was_training = model.training
    model.eval()
    with tqdm(total=mine, desc=task.title, unit="problem", disable=not progress or rank != 0,
              dynamic_ncols=True) as bar:
        if task.eval_type == "categorical":
            records = _categorical(task, model, tokenizer, n, batch_size, rank, world, bar)
        else:
            records = _generative(task, model, tokenizer, n, rank, world, bar, num_samples=num_samples,
                                  max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k)
    model.train(was_training)
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, records)
        records = [r for part in gathered for r in part]
    records.sort(key=lambda r: r["index"])
    passed = sum(r["correct"] for r in records)
    accuracy = passed / len(records)
    return {"title": task.title, "accuracy": accuracy, "centered": centered(accuracy, task.baseline),
            "passed": passed, "total": len(records), "records": records}


def load_tasks(names, data: str | None = None) -> dict[str, ChatTask]:
    if data is not None and os.path.isfile(data) and len(names) > 1:
        raise ValueError(f"--data {data} is one file but {len(names)} tasks were asked for: point --data at a "
                         "directory holding <task>.jsonl (or .parquet) per task, or pick one --task")
    return {name: ALL_TASKS[name](data) for name in names}


def evaluate_chat(model, tokenizer, tasks=tuple(TASKS), data: str | None = None, **kwargs) -> dict:
    """Evaluate ``tasks`` (names or loaded ChatTask objects) and compute ChatCORE. ``kwargs`` go to
    ``evaluate_task``. Returns ``{"results": {name: {...}}, "chatcore": x|None, "chatcore_cat": y|None}``."""
    loaded = {t.name: t for t in tasks if isinstance(t, ChatTask)}
    loaded.update(load_tasks([t for t in tasks if not isinstance(t, ChatTask)], data))
    results = {name: evaluate_task(task, model, tokenizer, **kwargs) for name, task in loaded.items()}
    return {"results": results, "chatcore": chatcore(results), "chatcore_cat": chatcore(results, CATEGORICAL)}


def format_table(out: dict) -> str:
    lines = ["| Task | Accuracy | Centered | Passed |", "|---|---:|---:|---:|"]
    for r in out["results"].values():
        lines.append(f"| {r['title']} | {r['accuracy']:.4f} | {r['centered']:.4f} | {r['passed']}/{r['total']} |")
    for key, label in (("chatcore", "ChatCORE"), ("chatcore_cat", "ChatCORE_cat")):
        if out.get(key) is not None:
            lines.append(f"| **{label}** | | **{out[key]:.4f}** | |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# CLI

_ALIASES = {t.title.lower(): name for name, t in ALL_TASKS.items()}  # nanochat's names work too: ARC-Easy, GSM8K, ...


def _task_names(spec: str) -> list[str]:
    names = []
    for part in spec.split(","):
        part = part.strip()
        if part.lower() == "all":
            names += list(TASKS)
        elif part.lower() in ALL_TASKS or part.lower() in _ALIASES:
            names.append(_ALIASES.get(part.lower(), part.lower()))
        else:
            raise argparse.ArgumentTypeError(f"unknown task {part!r}; choose from {', '.join(ALL_TASKS)} or all")
    return list(dict.fromkeys(names))


def _add_run_flags(p):
    """The flags of one set of tasks (what `--also` may repeat); the model's flags are given once."""
    p.add_argument("--task", type=_task_names, default=list(TASKS),
                   help=f"{'|'.join(ALL_TASKS)}|all (the five ChatCORE tasks), or several separated by commas "
                        "(default: all)")
    p.add_argument("--data", default=None,
                   help="local data in the Hub datasets' formats instead of the Hub: a .jsonl/.json/.parquet file "
                        "(one task), or a directory with <task>.jsonl|.parquet, <task>/, or a download of the Hub "
                        "repo (e.g. ARC-Easy/test-*.parquet)")
    p.add_argument("--limit", type=int, default=None, help="first N problems per task (nanochat's --max-problems)")
    p.add_argument("--output", default=None, help="write results (and per-problem records) as JSON here")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per forward, categorical tasks (default 8)")
    p.add_argument("--num-samples", type=int, default=1, help="completions per problem, generative (default 1)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=50)


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m evaluation.chat", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a transformers causal LM directory with a nanochat tokenizer")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --model)")
    _add_run_flags(p)
    p.add_argument("--also", action="append", default=[], metavar="'FLAGS'",
                   help="another set of tasks for the same model in the same process (the model is loaded, and "
                        "with --compile compiled, once): a quoted string of the flags above from --task to --top-k, "
                        "each defaulting to the main set's (but --output), e.g. --also '--task gsm8k --data "
                        "sample.jsonl --output b.json'; repeatable")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: this rank's accelerator or cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype (auto: bfloat16 on CUDA, float32 elsewhere)")
    p.add_argument("--trust-remote-code", action="store_true", help="use the modeling code saved with the model")
    p.add_argument("--compile", action="store_true", help=static_decode.COMPILE_HELP)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    also = argparse.ArgumentParser(prog="--also", add_help=False, exit_on_error=False)
    _add_run_flags(also)  # a set's flags default to the main set's (so --limit N applies to all), but its output
    also.set_defaults(**{k: getattr(args, k) for k in vars(also.parse_args([])) if k != "output"})
    args.runs = [args]
    for flags in args.also:
        try:
            run, unknown = also.parse_known_args(shlex.split(flags))
        except (argparse.ArgumentError, ValueError) as e:
            p.error(f"--also {flags!r}: {e}")
        if unknown:
            p.error(f"--also {flags!r}: {' '.join(unknown)} cannot go in --also (only --task ... --top-k; the "
                    "model's flags are given once, outside it)")
        args.runs.append(run)
    for run in args.runs:
        if run.limit is not None and run.limit < 1:
            p.error("--limit must be >= 1")
    return args


def main(argv=None) -> int:
    return cli_main(_main, argv)


def _main(argv=None) -> int:
    args = _parse(argv)
    if args.compile:
        static_decode.enable()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from accelerate import PartialState
    from transformers import AutoModelForCausalLM

    from modeling_nanochat.checkpoints.model_dirs import load_model, load_model_tokenizer
    from modeling_nanochat.utils.io import atomic_write

    on_cpu = (args.device or "").startswith("cpu") or not torch.cuda.is_available()
    state = PartialState(cpu=on_cpu)  # starts torch.distributed under torchrun / accelerate launch (gloo on CPU)
    device = torch.device(args.device) if args.device else state.device
    dtype = torch_dtype(args.dtype, device)
    try:
        with state.main_process_first():  # one rank fills the datasets cache, the others read it
            # every set's data is read before the model is loaded: a bad path fails in seconds
            all_tasks = [load_tasks(run.task, run.data) for run in args.runs]
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model = load_model(args.model, AutoModelForCausalLM, dtype=dtype, trust_remote_code=args.trust_remote_code)
    model.to(device).eval()
    tokenizer = load_model_tokenizer(args.tokenizer or args.model, config=model.config,
                                     trust_remote_code=args.trust_remote_code)
    for run, tasks in zip(args.runs, all_tasks):
        if state.is_main_process:
            logger.info("ChatCORE: %s on %s (%s), %d process(es), tasks %s", args.model, device, dtype,
                        rank_world()[1], ", ".join(t.title for t in tasks.values()))
        out = evaluate_chat(model, tokenizer, tasks=list(tasks.values()), limit=run.limit, batch_size=run.batch_size,
                            num_samples=run.num_samples, max_new_tokens=run.max_new_tokens,
                            temperature=run.temperature, top_k=run.top_k, progress=not args.no_progress)
        if state.is_main_process:
            print(format_table(out))
            if run.output:
                settings = {**vars(args), **vars(run)}  # the model's flags, then this set's
                out["settings"] = {k: v for k, v in settings.items() if k not in ("output", "also", "runs")}
                out["world_size"] = rank_world()[1]
                if "humaneval" in tasks:
                    from .sandbox import capabilities

                    out["sandbox"] = capabilities()
                atomic_write(run.output, json.dumps(out, indent=2, ensure_ascii=False))  # never half-written
                logger.info("wrote %s", run.output)
    state.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
