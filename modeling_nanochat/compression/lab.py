"""The compression lab's run: build the quantized variants of one model, add the variants trained elsewhere
(distilled students, pruned and healed models), measure every one the same way (`measure.py`) and write the
report (`report.py`). `recipes/compress.py` is its command line.

Speed is measured in interleaved rounds (round r times every variant once) and reported as medians, so a slow
moment of the machine lands on all variants alike. Quality and size are deterministic and measured once; peak
memory once per variant in a fresh process.
"""

from __future__ import annotations

import os

import torch

from modeling_nanochat.compression import measure
from modeling_nanochat.compression.measure import Variant
from modeling_nanochat.utils.errors import NanochatError
from modeling_nanochat.utils.io import atomic_write_json


def quantized_variants(model_dir: str, methods: list[str], work_dir: str, say) -> tuple[list[Variant], list[dict]]:
    """A Variant per method that works here (saved under work_dir/<method>, or quantized at load time where
    transformers cannot save the backend's weights), and an n/a row (with the one-line reason) per method that
    does not."""
    variants, missing = [], []
    if not methods:
        return variants, missing
    from modeling_nanochat.compression.quantize import QuantizeError, available, quantize_model, saveable

    for method in methods:
        ok, reason = available(method)
        if not ok:
            say(f"{method}: n/a here: {reason}")
            missing.append({"name": method, "kind": "quantized", "unavailable": reason})
            continue
        if not saveable(method):
            say(f"{method}: quantized at load time (transformers cannot save its weights)")
            variants.append(Variant(method, model_dir, method=method, kind="quantized",
                                    note="quantized at load time: transformers cannot save this backend's weights, "
                                         "so it has no size on disk"))
            continue
        out = os.path.join(work_dir, method)
        try:
            record = quantize_model(model_dir, method, out, overwrite=True)
        except QuantizeError as e:
            say(f"{method}: n/a here: {e}")
            missing.append({"name": method, "kind": "quantized", "unavailable": str(e)})
            continue
        say(f"{method}: saved to {out}")
        variants.append(Variant(method, out, kind="quantized", extra={"record": record}))
    return variants, missing


def run_lab(model_dir: str, output_dir: str, *, methods: list[str], extra: list[Variant] = (),
            keep_ablation: str | None = "torchao-int8-wo", val_data: str | None = None, val_tokens: int = 65536,
            core_bundle: str | None = None, core_max_per_task: int = 100, chat_data: str | None = None,
            chat_limit: int = 100, repeats: int = 3, prompt_len: int = 128, new_tokens: int = 32,
            memory: bool = True, say=print) -> dict:
    """Measure `model_dir` (fp32), its quantized variants and `extra`, write compression.{json,md,png} into
    `output_dir`, return the report dict."""
    from modeling_nanochat.checkpoints.model_dirs import check_local_model
    from modeling_nanochat.compression.report import machine, write

    check_local_model(model_dir)
    os.makedirs(output_dir, exist_ok=True)
    work = os.path.join(output_dir, "variants")
    variants = [Variant("fp32", model_dir, kind="fp32")]
    quantized, missing = quantized_variants(model_dir, methods, work, say)
    variants += quantized
    if keep_ablation and any(v.name == keep_ablation for v in quantized):
        variants += _keep_ablation(model_dir, keep_ablation, work, say)
    variants += list(extra)

    shared = _shared_eval_inputs(model_dir, val_data)
    references = {}  # group -> log-probs of the group's first model on the shared ids
    rows, loaded = [], []
    for v in variants:
        say(f"measuring {v.name} ({v.model_dir}{', ' + v.method if v.method else ''})")
        row = {"name": v.name, "kind": v.kind, "group": v.group, "model_dir": os.path.abspath(v.model_dir),
               "method": v.method}
        try:
            model, measured = _measure_once(v, shared, val_tokens=val_tokens, core_bundle=core_bundle,
                                            core_max_per_task=core_max_per_task, chat_data=chat_data,
                                            chat_limit=chat_limit, memory=memory)
        except NanochatError:
            raise
        except Exception as e:  # a backend that fails on this machine midway: an n/a row, not a lost report
            reason = f"failed while measuring ({type(e).__name__}: {str(e).strip().splitlines()[0][:200]})"
            say(f"  {v.name}: {reason}")
            missing.append({**row, "unavailable": reason})
            continue
        row.update(measured)
        if shared["ids"] is not None:
            if v.group not in references:
                references[v.group] = measure.log_probs(model, shared["ids"])
                row["is_ref"] = True
            row.update(measure.divergence(model, shared["ids"], references[v.group]))
        if v.note:
            row["note"] = v.note
        rows.append(row)
        loaded.append(model)
        say("  " + ", ".join(f"{k} {row[k]:.4g}" for k in ("val_bpb", "core", "synth_chat", "synth_arith")
                             if row.get(k) is not None))
    timings = [[] for _ in rows]
    for r in range(repeats):
        say(f"speed round {r + 1}/{repeats}")
        for i, model in enumerate(loaded):
            timings[i].append(measure.speed_round(model, prompt_len=prompt_len, new_tokens=new_tokens))
    for row, t in zip(rows, timings):
        row.update(measure.medians(t))
        row["speed_rounds"] = t
    meta = {"model": os.path.abspath(model_dir), "machine": machine(), "repeats": repeats, "prompt_len": prompt_len,
            "new_tokens": new_tokens, "val_tokens": val_tokens if shared["source"] is not None else None,
            "core": core_bundle, "chat_data": chat_data, "chat_limit": chat_limit,
            "memory_kind": next((r["memory_kind"] for r in rows if "memory_kind" in r), "not measured")}
    report = write(rows + missing, meta, output_dir)
    atomic_write_json(os.path.join(output_dir, "compression.json"),
                      {"rows": report["rows"], "fronts": report["fronts"], "meta": meta})
    return report


def _measure_once(v: Variant, shared: dict, *, val_tokens, core_bundle, core_max_per_task, chat_data, chat_limit,
                  memory) -> tuple[object, dict]:
    """(the loaded model, its size, quality and peak memory): everything but speed, measured once."""
    model, tokenizer = measure.load_variant(v, torch.device("cuda") if torch.cuda.is_available() else None)
    row = measure.size_of(v, model.config)
    record = v.extra.get("record") or {}
    if record.get("quantized_bytes_before") and record.get("quantized_bytes_after"):
        row["quantized_bytes_ratio"] = record["quantized_bytes_before"] / record["quantized_bytes_after"]
    row.update(measure.quality(model, tokenizer, token_bytes=shared["token_bytes"], val_source=shared["source"],
                               val_tokens=val_tokens, core_bundle=core_bundle, core_max_per_task=core_max_per_task,
                               # base models are not chat models: their table compares bpb and CORE
                               chat_data=chat_data if v.group == "chat" else None, chat_limit=chat_limit))
    if memory:
        row.update(measure.peak_memory(v))
    return model, row


def _keep_ablation(model_dir: str, method: str, work: str, say) -> list[Variant]:
    """The same method with every Linear quantized (head and gates too): the measurement behind the default
    choice of what stays in high precision."""
    from modeling_nanochat.compression.quantize import QuantizeError, quantize_model

    out = os.path.join(work, method + "-keep-none")
    try:
        record = quantize_model(model_dir, method, out, keep="none", overwrite=True)
    except QuantizeError as e:
        say(f"{method} with keep=none: n/a here: {e}")
        return []
    return [Variant(f"{method} (keep none)", out, kind="quantized", extra={"record": record},
                    note="every Linear quantized, head and gates included: compare with the default row to see what "
                         "keeping them in high precision buys")]


def _shared_eval_inputs(model_dir: str, val_data: str | None) -> dict:
    """The val data source and token byte lengths, shared by every variant (same tokenizer family)."""
    if val_data is None:
        return {"source": None, "token_bytes": None, "ids": None}
    from modeling_nanochat.checkpoints.model_dirs import load_model_tokenizer
    from modeling_nanochat.data.sources import resolve_data
    from modeling_nanochat.tokenizer.tokenizer import token_bytes_of

    try:
        source = resolve_data(val_data, download=False)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise NanochatError(f"--val-data {val_data}: {e}", "point it at the pretraining data dir") from e
    from modeling_nanochat.checkpoints.model_dirs import load_config
    from modeling_nanochat.data.loader import PretrainLoader

    tokenizer = load_model_tokenizer(model_dir)
    seq_len = min(256, load_config(model_dir).max_position_embeddings)
    ids, _ = next(PretrainLoader(source, tokenizer, batch_size=8, seq_len=seq_len, split="val"))
    return {"source": source, "token_bytes": token_bytes_of(model_dir, tokenizer), "ids": ids}


def extra_variant(spec: str, group: str = "chat") -> Variant:
    """`NAME=DIR[:KIND]` from the command line (KIND: distilled, pruned, scratch, ...; default: other)."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise NanochatError(f"--variant {spec!r}: expected NAME=DIR[:KIND]",
                            "e.g. --variant distilled-d2=runs/distill/sft:distilled")
    path, _, kind = rest.partition(":")
    return Variant(name, path, kind=kind or "other", group=group)

