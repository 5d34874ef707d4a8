"""CORE, nanochat's base-model score (DCLM's in-context tasks, centered and averaged), on any transformers causal LM.

    python -m evaluation.core --model DIR [--bundle DIR] [--max-per-task N] [--tasks a,b] [--output FILE.json]
    torchrun --nproc_per_node 2 -m evaluation.core --model DIR ...   # examples split by rank, results gathered

From Python, e.g. every M steps of pretraining (in a distributed run every rank calls it and gets the result)::

    from evaluation.core import evaluate_core
    evaluate_core(model, tokenizer, bundle_dir, max_per_task=500)   # {"results": {...}, "core": x, "cropped": {...}}

Numbers match nanochat's `scripts/base_eval.py` (same rows, few-shot picks, prompts, BOS, scored spans and
tie-breaking; see core_bundle / core_prompts), while scoring is batched across examples (core_scoring). As in
nanochat, prompts are never truncated; only a model with a hard position limit (a learned position table, e.g.
GPT-2's 1024) gets longer prompts cut from the left, and those are counted in "cropped" and reported.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from modeling_nanochat.utils.distributed import rank_world
from modeling_nanochat.utils.dtypes import torch_dtype
from modeling_nanochat.utils.errors import cli_main

from .core_bundle import CoreTask, Row, ensure_bundle, load_bundle, load_rows
from .core_prompts import PromptEncoder, Request, build_requests
from .core_score import core_summary
from .core_scoring import Scorer, SequenceScore, crop_left, position_limit

logger = logging.getLogger(__name__)


def _judge(task: CoreTask, req: Request, scores: list[SequenceScore]) -> dict:
    """nanochat's rules: language_modeling is right iff greedy decoding reproduces every continuation token;
    the options of multiple_choice/schema compete on mean loss, the first lowest wins."""
    if task.task_type == "language_modeling":
        seq = req.sequences[0]
        target = seq.tokens[seq.start:seq.end]
        return {"correct": scores[0].argmax == target, "argmax": scores[0].argmax, "target": target}
    losses = [s.mean_loss for s in scores]
    pred = losses.index(min(losses))
    return {"correct": pred == req.gold, "pred": pred, "mean_losses": losses}


def _score_task(task: CoreTask, rows: list[Row], scorer: Scorer, encode: PromptEncoder, limit: int | None,
                rank: int, world: int, bar, return_items: bool) -> dict[int, dict]:
    requests = build_requests(task, rows, range(rank, len(rows), world), encode)  # nanochat's striding
    seqs, owner, cropped = [], [], set()
    for k, req in enumerate(requests):
        for seq in req.sequences:
            try:
                seq, cut = crop_left(seq, limit)
            except ValueError as e:
                raise ValueError(f"{rows[req.idx].where} ({task.label}): {e}") from None
            if cut:
                cropped.add(k)
            seqs.append(seq)
            owner.append(k)
    remaining = [len(r.sequences) for r in requests]

    def on_batch(batch):
        for i in batch:
            remaining[owner[i]] -= 1
            if remaining[owner[i]] == 0:
                bar.update(1)

    scores = scorer.score(seqs, on_batch, groups=owner)  # an example's options share their prefix's forward
    if world > 1:  # same number of forwards on every rank (sharded weights are gathered inside forward)
        mine = scorer.n_batches(seqs, groups=owner)
        most = torch.tensor([mine], device=scorer.device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        for _ in range(int(most.item()) - mine):
            scorer.idle_forward()
    out, pos = {}, 0
    for k, req in enumerate(requests):
        n = len(req.sequences)
        record = _judge(task, req, scores[pos:pos + n])
        pos += n
        record["cropped"] = k in cropped
        if return_items:
            record["sequences"] = [(s.tokens, s.start, s.end) for s in seqs[pos - n:pos]]
        else:
            record = {"correct": record["correct"], "cropped": record["cropped"]}
        out[req.idx] = record
    return out


def evaluate_core(model, tokenizer, bundle_dir=None, *, max_per_task: int = -1, tasks: list[str] | None = None,
                  batch_size: int = 32, max_batch_tokens: int | None = None, device=None, max_length: int | None = None,
                  progress: bool = True, return_items: bool = False, share_prefix: bool = True) -> dict:
    """CORE of an in-memory causal LM. Returns ``{"results": {task: {"accuracy", "centered"}}, "core": float,
    "cropped": {task: n}}`` (+ ``"items"``: per-example records, when `return_items`).

    bundle_dir: the eval bundle (downloaded from nanochat's URL into it when it does not exist; default
    $NANOCHAT_BASE_DIR/eval_bundle). max_per_task > 0 evaluates nanochat's subsample of that size. batch_size and
    max_batch_tokens (default: 2048 on CPU, 32768 elsewhere) bound one forward. device: where inputs go (default:
    the model's). max_length: cut longer prompts from the left (default: the model's hard position limit, None for
    rotary models). share_prefix: run an example's common prompt prefix once for all its options (see
    core_scoring.Scorer; False: every option whole, as nanochat does). When torch.distributed is initialized,
    every rank must call this; examples are split by rank and results gathered. The model is put in eval mode and
    given back in the mode it came in.
    """
    rank, world = rank_world()
    specs = load_bundle(ensure_bundle(bundle_dir), tasks)
    data = [(spec, load_rows(spec, max_per_task)) for spec in specs]  # every row checked before any forward
    if device is None:
        device = next(model.parameters()).device
    encode = PromptEncoder(tokenizer)
    scorer = Scorer(model, encode.bos_id, device, batch_size, max_batch_tokens,  # nanochat pads with BOS
                    share_prefix=share_prefix)
    limit = max_length if max_length is not None else position_limit(model)
    total = sum(len(range(rank, len(rows), world)) for _, rows in data)
    bar = tqdm(total=total, unit="ex", desc="CORE", disable=not progress or rank != 0, dynamic_ncols=True)
    was_training = model.training
    model.eval()
    correct, items, cropped = {}, {}, {}
    try:
        for spec, rows in data:
            bar.set_postfix_str(spec.label)
            mine = _score_task(spec, rows, scorer, encode, limit, rank, world, bar, return_items)
            merged = {}
            if world > 1:
                gathered = [None] * world
                dist.all_gather_object(gathered, mine)
                for part in gathered:
                    merged.update(part)
            else:
                merged = mine
            records = [merged[i] for i in range(len(rows))]
            correct[spec.label] = [r["correct"] for r in records]
            cropped[spec.label] = sum(r["cropped"] for r in records)
            items[spec.label] = records
            if cropped[spec.label] and rank == 0:
                logger.warning("%s: %d of %d examples had prompts longer than the model's %d positions, cut from "
                               "the left", spec.label, cropped[spec.label], len(rows), limit)
    finally:
        bar.close()
        model.train(was_training)
    out = core_summary(correct, {spec.label: spec.random_baseline for spec, _ in data})
    out["cropped"] = cropped
    if return_items:
        out["items"] = items
    return out


def format_table(out: dict) -> str:
    lines = ["| task | accuracy | centered |", "|---|---:|---:|"]
    lines += [f"| {task} | {r['accuracy']:.4f} | {r['centered']:.4f} |" for task, r in out["results"].items()]
    lines.append(f"| **CORE** | | **{out['core']:.4f}** |")
    notes = [f"{task}: {n} prompts cut from the left to the model's position limit"
             for task, n in out.get("cropped", {}).items() if n]
    return "\n".join(lines + ([""] + notes if notes else []))


# ----------------------------------------------------------------------------------------------------------------
# CLI


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m evaluation.core", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a transformers causal LM directory (ours, GPT-2, ...)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --model)")
    p.add_argument("--bundle", default=None, help="eval bundle directory with core.yaml (default: "
                   "$NANOCHAT_BASE_DIR/eval_bundle or ~/.cache/nanochat/eval_bundle; downloaded when absent)")
    p.add_argument("--max-per-task", type=int, default=-1, help="nanochat's subsample per task (-1: all rows)")
    p.add_argument("--tasks", default=None, help="comma-separated task labels (default: all in core.yaml)")
    p.add_argument("--output", default=None, help="write the results as JSON here")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per forward (default 32)")
    p.add_argument("--max-batch-tokens", type=int, default=None,
                   help="padded tokens per forward (default: 2048 on CPU, 32768 on accelerators)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: this rank's accelerator or cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype (auto: bfloat16 on CUDA as nanochat evaluates, float32 elsewhere)")
    p.add_argument("--max-length", type=int, default=None,
                   help="cut longer prompts from the left (default: the model's hard position limit, if any)")
    p.add_argument("--trust-remote-code", action="store_true", help="use the modeling code saved with the model")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    return cli_main(_main, argv)


def _main(argv=None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from accelerate import PartialState
    from transformers import AutoModelForCausalLM

    from modeling_nanochat.checkpoints.model_dirs import load_model, load_model_tokenizer
    from modeling_nanochat.utils.io import atomic_write_json

    # starts torch.distributed under torchrun / accelerate launch; on CPU only with cpu=True (else it stays one
    # process per launch, silently)
    on_cpu = (args.device or "").startswith("cpu") or not torch.cuda.is_available()
    state = PartialState(cpu=on_cpu)
    device = torch.device(args.device) if args.device else state.device
    rank, world = rank_world()
    dtype = torch_dtype(args.dtype, device)
    if rank == 0:
        logger.info("CORE: %s on %s (%s), %d process(es)", args.model, device, dtype, world)
    model = load_model(args.model, AutoModelForCausalLM, dtype=dtype, trust_remote_code=args.trust_remote_code)
    model.to(device)
    tokenizer = load_model_tokenizer(args.tokenizer or args.model, config=model.config,
                                     trust_remote_code=args.trust_remote_code)
    out = evaluate_core(model, tokenizer, args.bundle, max_per_task=args.max_per_task,
                        tasks=args.tasks.split(",") if args.tasks else None, batch_size=args.batch_size,
                        max_batch_tokens=args.max_batch_tokens, device=device, max_length=args.max_length,
                        progress=not args.no_progress)
    if rank == 0:
        print(format_table(out))
        if args.output:
            atomic_write_json(args.output, out)  # a killed run leaves no half-written result
            logger.info("wrote %s", args.output)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
