"""The lab's outputs: `compression.md` (one row per variant, the Pareto fronts marked, the machine named) and
`compression.png` (quality against size and against decode latency). Pure functions of the measured rows."""

from __future__ import annotations

import os
import platform

import torch

from modeling_nanochat.utils.io import atomic_write
from modeling_nanochat.utils.plotting import pyplot

# (key, header, format); a missing value prints as n/a
COLUMNS = (("kind", "kind", "{}"), ("params", "params", "{:,}"), ("disk_bytes", "disk MB", "mb"),
           ("quantized_bytes_ratio", "quantized matrices", "{:.2f}x smaller"),
           ("peak_memory_bytes", "peak mem MB", "mb"),
           ("prefill_tok_s_b1", "prefill tok/s b1", "{:,.0f}"), ("prefill_tok_s_b8", "prefill tok/s b8", "{:,.0f}"),
           ("decode_tok_s_b1", "decode tok/s b1", "{:,.0f}"), ("decode_tok_s_b8", "decode tok/s b8", "{:,.0f}"),
           ("val_bpb", "val bpb", "{:.4f}"), ("kl_to_ref", "KL to ref", "{:.2e}"), ("top1_agree", "top-1 = ref", "{:.1%}"), ("core", "CORE", "{:.4f}"), ("synth_chat", "synth-chat", "{:.1%}"),
           ("synth_arith", "synth-arith", "{:.1%}"))


def machine() -> str:
    if torch.cuda.is_available():
        dev = f"{torch.cuda.get_device_name()} (CUDA)"
    else:
        dev = f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} " \
              "torch threads"
    return f"{dev}; torch {torch.__version__}; {platform.platform()}"


def quality_key(rows: list[dict], group: str = "chat") -> tuple[str, bool]:
    """The quality a group's fronts use (and whether lower is better): for chat models the synth-chat accuracy
    where measured (what a chat model is for; fine-tuning moves its bpb on pretraining text), for base models
    val bits per byte."""
    measured = {k for r in rows for k in ("val_bpb", "synth_chat") if r.get(k) is not None}
    if group == "chat" and "synth_chat" in measured or "val_bpb" not in measured:
        return "synth_chat", False
    return "val_bpb", True


def pareto_front(rows: list[dict], cost: str, quality: str, lower_is_better: bool) -> list[str]:
    """Names of the rows no other row beats on both `cost` (lower is better) and `quality`."""
    ok = [r for r in rows if r.get(cost) is not None and r.get(quality) is not None]

    def better_or_equal(a, b):  # a at least as good as b on quality
        return a <= b if lower_is_better else a >= b

    front = []
    for r in ok:
        dominated = any(o is not r and o[cost] <= r[cost] and better_or_equal(o[quality], r[quality])
                        and (o[cost] < r[cost] or o[quality] != r[quality]) for o in ok)
        if not dominated:
            front.append(r["name"])
    return front


def _cell(value, fmt):
    if value is None:
        return "n/a"
    if fmt == "mb":
        return f"{value / 1e6:.2f}"
    return fmt.format(value)


GROUP_TITLES = {"chat": "Chat models (the model given and its compressed variants)",
                "base": "Base models (distillation and pruning, before chat fine-tuning)"}


def with_fronts(rows: list[dict]) -> tuple[list[dict], dict]:
    """Rows with `latency_s_per_token` (batch-1 decode) and, per group of rows, the fronts vs disk size and vs
    latency (a base model and a chat model are not compared with each other)."""
    for r in rows:
        d = r.get("decode_tok_s_b1")
        r["latency_s_per_token"] = 1 / d if d else None
    fronts = {}
    for group in _groups(rows):
        members = [r for r in rows if r.get("group", "chat") == group]
        q, lower = quality_key(members, group)
        fronts[group] = {"quality": q, "size": pareto_front(members, "disk_bytes", q, lower),
                         "latency": pareto_front(members, "latency_s_per_token", q, lower)}
    return rows, fronts


def _groups(rows):
    return list(dict.fromkeys(r.get("group", "chat") for r in rows))


def markdown(rows: list[dict], fronts: dict, meta: dict) -> str:
    head = ["variant"] + [h for _, h, _ in COLUMNS] + ["front"]
    lines = [f"# Compression lab: {meta['model']}", "",
             f"Machine: {meta['machine']}. Speed: medians of {meta['repeats']} interleaved rounds (prefill "
             f"{meta['prompt_len']} tokens, decode {meta['new_tokens']} greedy tokens after a 16-token prompt). "
             f"Quality: val bpb on {meta.get('val_tokens', 'n/a')} val tokens, CORE on {meta.get('core', 'n/a')}, "
             f"chat tasks on the first {meta.get('chat_limit', 'n/a')} problems of {meta.get('chat_data', 'n/a')}. "
             "Peak memory: " + meta.get("memory_kind", "n/a") + ". `front`: on the Pareto front of the group's "
             "quality (chat models: synth-chat accuracy; base models: val bpb) against size on disk (S) and against "
             "batch-1 decode latency (L). `KL to ref` / `top-1 = ref`: mean KL divergence from the group's first "
             "model (ref) of the next-token distributions on the same val tokens, and how often the two agree on "
             "the most likely token."]
    for group in _groups(rows):
        f = fronts[group]
        lines += ["", f"## {GROUP_TITLES.get(group, group)}", "",
                  "| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 3) + ["---"])
                  + "|"]
        for r in (r for r in rows if r.get("group", "chat") == group):
            mark = "".join(m for m, key in (("S", "size"), ("L", "latency")) if r["name"] in f[key])
            cells = [r["name"] + (" (ref)" if r.get("is_ref") else "")] + [_cell(r.get(k), fmt) for k, _, fmt in
                                                                            COLUMNS] + [mark]
            lines.append("| " + " | ".join(cells) + " |")
    missing = [r for r in rows if r.get("unavailable")]
    if missing:
        lines += ["", "Not measured here:", ""] + [f"- **{r['name']}**: {r['unavailable']}" for r in missing]
    notes = [r for r in rows if r.get("note")]
    if notes:
        lines += ["", "Notes:", ""] + [f"- **{r['name']}**: {r['note']}" for r in notes]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], fronts: dict, path: str) -> bool:
    plt = pyplot(f"{path} (the markdown table has the same numbers)")
    if plt is None:
        return False
    groups = _groups([r for r in rows if not r.get("unavailable")]) or ["chat"]
    fig, axes = plt.subplots(len(groups), 2, figsize=(12, 4.5 * len(groups)), squeeze=False)
    for axrow, group in zip(axes, groups):
        q = fronts[group]["quality"]
        members = [r for r in rows if r.get("group", "chat") == group]
        for ax, cost, key, label in ((axrow[0], "disk_bytes", "size", "weights on disk (MB)"),
                                     (axrow[1], "latency_s_per_token", "latency", "batch-1 decode latency (ms/token)")):
            scale = 1e-6 if cost == "disk_bytes" else 1e3
            pts = [r for r in members if r.get(cost) is not None and r.get(q) is not None]
            for r in pts:
                on = r["name"] in fronts[group][key]
                ax.scatter(r[cost] * scale, r[q], marker="o" if on else "x", s=40, color="C0" if on else "C1")
                ax.annotate(r["name"], (r[cost] * scale, r[q]), fontsize=7, xytext=(3, 3), textcoords="offset points")
            front = sorted((r for r in pts if r["name"] in fronts[group][key]), key=lambda r: r[cost])
            if len(front) > 1:
                ax.plot([r[cost] * scale for r in front], [r[q] for r in front], color="C0", lw=1)
            ax.set_xlabel(label)
            ax.set_ylabel(q.replace("_", " ") + (" (lower is better)" if q == "val_bpb" else ""))
            ax.set_title(f"{group} models", fontsize=9)
            ax.grid(alpha=0.3)
    fig.suptitle("quality vs size and latency (o: Pareto front)")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def write(rows: list[dict], meta: dict, output_dir: str) -> dict:
    rows, fronts = with_fronts(rows)
    os.makedirs(output_dir, exist_ok=True)
    md = markdown(rows, fronts, meta)
    atomic_write(os.path.join(output_dir, "compression.md"), md)
    plotted = plot(rows, fronts, os.path.join(output_dir, "compression.png"))
    return {"rows": rows, "fronts": fronts, "meta": meta, "markdown": md, "plot": plotted}
