"""The speedrun's report card: ``<run>/report.md`` and ``<run>/report/curves.png``, like nanochat's report.md.

    python -m modeling_nanochat.apps.report_card runs/speedrun-tiny     # recipes/speedrun.sh runs it at the end

It only reads what the stages wrote (``speedrun.json``, ``stages/*.json``, ``base/`` and ``sft/``/``rl/``
``metrics.jsonl``, ``eval/*.json``), so it can be rebuilt at any time, also for a run that is still going; a
missing piece reads "-" (not run yet) or "n/a offline" (needs data that was not downloaded).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

from modeling_nanochat.utils.io import atomic_write
from modeling_nanochat.utils.plotting import pyplot
from modeling_nanochat.utils.run_files import read_json, read_metrics

CODE = Path(__file__).resolve().parents[2]  # the checkout whose commit the report names
GPT2_CORE = 0.256525  # GPT-2 (1.5B)'s CORE as nanochat measures it: the speedrun's target
STAGES = ["data", "tokenizer", "pretrain", "base_eval", "base_chat_eval", "sft", "sft_eval", "rl", "rl_eval",
          # the compression lab (RUN_COMPRESS=1): absent stages are left out of the table
          "distill", "scratch", "sft_distilled", "sft_scratch", "prune", "compress"]
# summary rows: (label, where it comes from). Chat tasks are keyed by evaluation.chat's task names.
REAL_CHAT = [("ARC-Easy", "arc_easy"), ("ARC-Challenge", "arc_challenge"), ("MMLU", "mmlu"), ("GSM8K", "gsm8k"),
             ("HumanEval", "humaneval")]
CPU_COST_PER_HOUR = 0.10  # a small cloud VM; override with COST_PER_HOUR
GPU_COST_PER_HOUR = 3.0  # per GPU, nanochat's framing ($24/h for 8xH100)


def _fmt(x, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _dollars(x: float) -> str:
    return f"${x:,.2f}" if x >= 1 else f"${x:.4f}"


def environment() -> list[str]:
    def cmd(*args) -> str:
        try:
            return subprocess.run(args, capture_output=True, text=True, timeout=10, cwd=CODE).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    import torch

    versions = []
    for name in ("torch", "transformers", "accelerate", "trl", "datasets", "tokenizers", "deepspeed"):
        try:
            from importlib.metadata import version
            versions.append(f"{name} {version(name)}")
        except Exception:  # noqa: BLE001 - not installed
            pass
    commit = cmd("git", "rev-parse", "--short", "HEAD")
    dirty = " (uncommitted changes)" if cmd("git", "status", "--porcelain", "--untracked-files=no") else ""
    cpu = ""
    if os.path.isfile("/proc/cpuinfo"):
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                   "")
    mem = ""
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        mem = f", {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB RAM"
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return [
        "| | |", "|---|---|",
        f"| git | {commit or 'not a git checkout'}{dirty} |",
        f"| machine | {platform.platform()}; {cpu or platform.processor()} x {os.cpu_count()} cores{mem} |",
        f"| GPUs | {', '.join(f'{n} x {g}' for g, n in Counter(gpus).items()) if gpus else 'none'} |",
        f"| Python | {platform.python_version()} |",
        f"| packages | {', '.join(versions)} |",
    ]


def chat_results(run: Path, stage: str) -> dict:
    """{task name: result} for one chat stage, from every eval/<stage>*.json (synthetic sets get their own names)."""
    out = {}
    for path in sorted((run / "eval").glob(f"{stage}*.json")):
        if path.name == "base.json":
            continue
        data = read_json(path) or {}
        suffix = path.stem[len(stage):]
        for name, result in (data.get("results") or {}).items():
            if suffix.startswith("-synthetic"):
                name = {"synth_chat": "synth-chat", "mmlu": "synth-mc", "gsm8k": "synth-arith"}.get(name, name)
            elif suffix == "-gsm8k-sample":
                name = "gsm8k-sample"
            out[name] = result
        if data.get("chatcore") is not None and suffix == "":
            out["chatcore"] = {"accuracy": data["chatcore"]}
    return out


def _load_run(run_dir) -> SimpleNamespace:
    """Everything the report reads from a speedrun directory (missing files read as empty)."""
    run = Path(run_dir)
    settings = read_json(run / "speedrun.json") or {}
    preset = settings.get("preset", "?")
    offline = preset == "tiny"
    stages = {s: read_json(run / "stages" / f"{s}.json") for s in STAGES}
    base_metrics = read_metrics(run / "base" / "metrics.jsonl", missing_ok=True)
    base_cfg = read_json(run / "base" / "run_config.json") or {}
    base_eval = read_json(run / "eval" / "base.json") or {}
    chats = {s: chat_results(run, s) for s in ("base", "sft", "rl")}
    sft_metrics = read_metrics(run / "sft" / "metrics.jsonl", missing_ok=True)
    rl_metrics = read_metrics(run / "rl" / "metrics.jsonl", missing_ok=True)
    gpus = int(settings.get("gpus") or 0)
    cost_per_hour = float(settings.get("cost_per_hour") or (GPU_COST_PER_HOUR * gpus if gpus else CPU_COST_PER_HOUR))

    core_runs = base_eval.get("core") or {}
    real_core = core_runs.get("core", {}).get("core")
    na = "n/a offline" if offline else "-"
    return SimpleNamespace(
        run=run,
        settings=settings,
        preset=preset,
        offline=offline,
        stages=stages,
        base_metrics=base_metrics,
        base_cfg=base_cfg,
        base_eval=base_eval,
        chats=chats,
        sft_metrics=sft_metrics,
        rl_metrics=rl_metrics,
        cost_per_hour=cost_per_hour,
        core_runs=core_runs,
        real_core=real_core,
        na=na,
    )


def _header(ctx) -> list[str]:
    """Title, preset and environment."""
    run, settings, preset, offline = ctx.run, ctx.settings, ctx.preset, ctx.offline
    lines = [f"# nanochat-hf speedrun report: `{run.name}`", "",
             f"Preset **{preset}** (depth {settings.get('depth', '?')}, vocab {settings.get('vocab_size', '?'):,}"
             if isinstance(settings.get("vocab_size"), int) else f"Preset **{preset}**",
             ]
    lines[-1] += (f", {settings.get('nproc', 1)} process(es), accelerate config "
                  f"`{settings.get('accelerate_config', 'none')}`). Generated {time.strftime('%Y-%m-%d %H:%M:%S')}.")
    if offline:
        lines += ["", "Offline run: every number below comes from data this project generates "
                  "(`modeling_nanochat/data/synthetic.py`, fixed seeds) or from the real-format samples in "
                  f"`{os.path.normpath(settings.get('shared_data', '../shared/data'))}`; the real benchmarks need downloads and read "
                  "*n/a offline*."]
    lines += ["", "## Environment", ""] + environment()
    return lines


def _summary(ctx) -> list[str]:
    """The metrics table: real benchmarks, then the offline ones."""
    settings, chats, core_runs, real_core, na = ctx.settings, ctx.chats, ctx.core_runs, ctx.real_core, ctx.na
    lines = []
    # -- summary table -----------------------------------------------------------------------------------------

    def chat_cell(stage: str, key: str, field: str = "accuracy") -> str:
        r = chats[stage].get(key)
        return _fmt(r[field]) if r and r.get(field) is not None else (na if key in dict(REAL_CHAT).values()
                                                                      or key == "chatcore" else "-")

    columns = ["BASE", "SFT"] + (["RL"] if settings.get("run_rl") else [])
    col_keys = {"BASE": "base", "SFT": "sft", "RL": "rl"}
    table = ["| Metric | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    table.append("| CORE | " + " | ".join([_fmt(real_core) if real_core is not None else na] +
                                            ["-"] * (len(columns) - 1)) + " |")
    for label, key in REAL_CHAT + [("ChatCORE", "chatcore")]:
        cells = [chat_cell(col_keys[c], key) if c != "BASE" else "-" for c in columns]
        table.append(f"| {label} | " + " | ".join(cells) + " |")
    extra = []
    if "core-sample" in core_runs:
        extra.append("| CORE, sample bundle (6 real tasks) | " + " | ".join(
            [_fmt(core_runs["core-sample"]["core"])] + ["-"] * (len(columns) - 1)) + " |")
    if any("gsm8k-sample" in chats[col_keys[c]] for c in columns):
        extra.append("| GSM8K, 40-row real sample | " + " | ".join(chat_cell(col_keys[c], "gsm8k-sample")
                                                                   for c in columns) + " |")
    if "synth-core" in core_runs:
        extra.append("| synth-core (CORE on the synthetic bundle) | " + " | ".join(
            [_fmt(core_runs["synth-core"]["core"])] + ["-"] * (len(columns) - 1)) + " |")
    for label, key in (("synth-chat (free-text answers)", "synth-chat"), ("synth-mc (MMLU format, chance 0.25)",
                       "synth-mc"), ("synth-arith (GSM8K format, calculator)", "synth-arith")):
        if any(key in chats[col_keys[c]] for c in columns):
            extra.append(f"| {label} | " + " | ".join(chat_cell(col_keys[c], key) for c in columns) + " |")
    lines += ["", "## Summary", ""] + table + extra
    return lines


def _learning_checks(ctx) -> list[str]:
    """Does the model learn at every stage (what the tiny run has to show)?"""
    run, offline, base_metrics, chats = ctx.run, ctx.offline, ctx.base_metrics, ctx.chats
    lines = []
    # what the tiny run has to show: the model learns at every stage
    checks = []
    val = [r for r in base_metrics if "val_bpb" in r]
    train = [r for r in base_metrics if "loss" in r]
    if len(val) >= 2:
        checks.append((f"base val bpb falls: {val[0]['val_bpb']:.3f} (step {val[0]['step']}) -> "
                       f"{val[-1]['val_bpb']:.3f} (step {val[-1]['step']})", val[-1]["val_bpb"] < val[0]["val_bpb"]))
    if len(train) >= 2:
        checks.append((f"base train loss falls: {train[0]['loss']:.3f} -> {train[-1]['smooth_loss']:.3f} (smoothed)",
                       train[-1]["smooth_loss"] < train[0]["loss"]))
    for key, a, b, need, what in (("synth-chat", "base", "sft", 0.10, "SFT raises synth-chat by >= 10 points"),
                                  ("synth-arith", "sft", "rl", 1e-9, "RL raises synth-arith over SFT")):
        ra, rb = chats[a].get(key), chats[b].get(key)
        if ra and rb:
            delta = rb["accuracy"] - ra["accuracy"]
            checks.append((f"{what}: {ra['accuracy']:.3f} -> {rb['accuracy']:.3f} ({delta * 100:+.1f} points)",
                           delta >= need))
    if checks:
        lines += ["", "Does it learn?", ""] + [f"- {'✅' if ok else '❌'} {text}" for text, ok in checks]
    if offline and (run / "data" / "manifest.json").exists():
        manifest = read_json(run / "data" / "manifest.json")
        lines += ["", "Synthetic tasks (seed {}, items held out from every training set):".format(manifest["seed"]), ""]
        lines += [f"- `{name}`: {text}" for name, text in manifest["tasks"].items()]
    return lines


def _stages_section(ctx) -> list[str]:
    """Wall time and cost per stage."""
    stages, cost_per_hour = ctx.stages, ctx.cost_per_hour
    lines = []
    # -- stages, time and cost ---------------------------------------------------------------------------------------
    lines += ["", "## Stages", "", "| stage | wall time | attempts | est. cost |", "|---|---:|---:|---:|"]
    total = 0.0
    for s in STAGES:
        info = stages[s]
        if info is None:
            continue
        total += info["seconds"]
        lines.append(f"| {s} | {_duration(info['seconds'])} | {info.get('attempts', 1)} | "
                     f"{_dollars(info['seconds'] / 3600 * cost_per_hour)} |")
    lines.append(f"| **total** | **{_duration(total)}** | | **{_dollars(total / 3600 * cost_per_hour)}** |")
    lines += ["", f"Cost at ${cost_per_hour:.2f}/hour for this machine (COST_PER_HOUR). A resumed stage's time is its "
              "last attempt's."]
    return lines


def _tokenizer_section(ctx) -> list[str]:
    """Compression of the trained tokenizer."""
    run = ctx.run
    lines = []
    # -- tokenizer -------------------------------------------------------------------------------------------------------
    tok = read_json(run / "tokenizer" / "tok_eval.json")
    if tok:
        lines += ["", "## Tokenizer", "", "| tokenizer | text | bytes | tokens | bytes/token |", "|---|---|---:|---:|---:|"]
        for name, texts in tok.items():
            for text, r in texts.items():
                lines.append(f"| {name} | {text} | {r['bytes']:,} | {r['tokens']:,} | {r['ratio']:.3f} |")
    return lines


def _base_model(ctx) -> list[str]:
    """Pretraining: its summary, bpb, CORE per task, samples, plan."""
    run, offline, base_metrics, base_cfg = ctx.run, ctx.offline, ctx.base_metrics, ctx.base_cfg
    base_eval, core_runs, real_core = ctx.base_eval, ctx.core_runs, ctx.real_core
    lines = []
    # -- base model ------------------------------------------------------------------------------------------------------
    if base_cfg or base_eval or base_metrics:
        plan = base_cfg.get("plan", {})
        lines += ["", "## Base model (pretraining)", ""]
        summary = run / "base" / "summary.md"
        if summary.exists():
            lines += summary.read_text().splitlines()[2:]  # its tables, without the title
        bpb = base_eval.get("bpb") or {}
        if bpb:
            lines += ["", f"base_eval bits per byte: train {_fmt(bpb.get('train'))}, val {_fmt(bpb.get('val'))}"]
        core_points = [r for r in base_metrics if "core" in r]
        reached = next((r for r in core_points if r["core"] >= GPT2_CORE), None)
        if real_core is not None or not offline:
            if reached:
                t = next((m.get("total_training_time") for m in base_metrics
                          if m.get("step") == reached["step"] and "total_training_time" in m), None)
                lines.append(f"\nTime to GPT-2's CORE ({GPT2_CORE}): reached at step {reached['step']:,}"
                             + (f" after {_duration(t)} of training" if t else "") + ".")
            else:
                lines.append(f"\nTime to GPT-2's CORE ({GPT2_CORE}): not reached (final CORE {_fmt(real_core)}).")
        else:
            lines.append(f"\nTime to GPT-2's CORE ({GPT2_CORE}): n/a offline (the real CORE bundle is a download).")
        for name, result in core_runs.items():
            lines += ["", f"CORE, {name}:", "", "| task | accuracy | centered |", "|---|---:|---:|"]
            lines += [f"| {t} | {r['accuracy']:.4f} | {r['centered']:.4f} |" for t, r in result["results"].items()]
            lines.append(f"| **CORE** | | **{result['core']:.4f}** |")
        if base_eval.get("samples"):
            lines += ["", "Greedy samples:", ""] + [f"- `{s['text']!r}`" for s in base_eval["samples"]]
        if plan:
            lines += ["", f"Plan: {plan.get('num_iterations', '?'):,} steps x {plan.get('total_batch_size', 0):,} "
                      f"tokens, {plan.get('total_flops', 0):.3e} FLOPs."]
    return lines


def _chat_stages(ctx) -> list[str]:
    """SFT and RL: losses, rewards, chat evals."""
    chats, sft_metrics, rl_metrics = ctx.chats, ctx.sft_metrics, ctx.rl_metrics
    lines = []
    # -- chat stages -----------------------------------------------------------------------------------------------------
    for stage, title, metrics in (("sft", "Chat SFT", sft_metrics), ("rl", "Chat RL (GRPO)", rl_metrics)):
        if not metrics and not chats[stage]:
            continue
        lines += ["", f"## {title}", ""]
        losses = [r for r in metrics if "loss" in r]
        evals = [r for r in metrics if "eval_bpb" in r]
        rewards = [r for r in metrics if "reward" in r]
        if losses:
            lines.append(f"- steps: {losses[-1]['step']:,}; train loss {losses[0]['loss']:.4f} -> {losses[-1]['loss']:.4f}")
        if evals:
            lines.append(f"- val bpb: {evals[0]['eval_bpb']:.4f} (before) -> {evals[-1]['eval_bpb']:.4f}")
        if rewards:
            k = max(1, len(rewards) // 4)
            first = sum(r["reward"] for r in rewards[:k]) / k
            last = sum(r["reward"] for r in rewards[-k:]) / k
            lines.append(f"- mean reward: first {k} steps {first:.3f} -> last {k} steps {last:.3f}")
        if chats[stage]:
            lines += ["", "| task | accuracy | passed |", "|---|---:|---:|"]
            for name, r in chats[stage].items():
                if "passed" in r:
                    lines.append(f"| {name} | {r['accuracy']:.4f} | {r['passed']}/{r['total']} |")
    return lines


def _compression(ctx) -> list[str]:
    """The compression lab's tables (recipes/compress.py writes them; this only links and quotes them)."""
    md = ctx.run / "compression" / "compression.md"
    if not md.is_file():
        return []
    body = md.read_text().split("\n")
    body = [("#" + line if line.startswith("## ") else line) for line in body if not line.startswith("# ")]
    return ["", "## Compression lab", "", f"From [{md.relative_to(ctx.run)}]({md.relative_to(ctx.run)}) "
            "(plot: compression/compression.png), made by `recipes/compress.py`."] + body


def write_report(run_dir: str | Path) -> Path:
    """`report.md` (and `report/curves.png`) of a speedrun directory, section by section."""
    ctx = _load_run(run_dir)
    lines = (_header(ctx) + _summary(ctx) + _learning_checks(ctx) + _stages_section(ctx) + _tokenizer_section(ctx)
             + _base_model(ctx) + _chat_stages(ctx) + _compression(ctx))
    run, base_metrics, sft_metrics, rl_metrics = ctx.run, ctx.base_metrics, ctx.sft_metrics, ctx.rl_metrics
    plot = plot_curves(run, base_metrics, sft_metrics, rl_metrics)
    if plot:
        lines += ["", "## Curves", "", f"![training curves]({plot.relative_to(run)})"]
    lines += ["", "---", "Made by `python -m modeling_nanochat.apps.report_card` from the files of the run directory."]
    out = run / "report.md"
    atomic_write(out, "\n".join(lines) + "\n")
    return out




def plot_curves(run: Path, base: list[dict], sft: list[dict], rl: list[dict]) -> Path | None:
    plt = pyplot("report without plots")
    if plt is None:
        return None
    if not base:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    train = [r for r in base if "loss" in r]
    val = [r for r in base if "val_bpb" in r]
    core = [r for r in base if "core" in r]
    ax = axes[0][0]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], alpha=0.3, label="loss")
    ax.plot([r["step"] for r in train], [r["smooth_loss"] for r in train], label="loss (EMA)")
    ax.set(title="pretraining: train loss", xlabel="step", ylabel="nats/token")
    ax.legend()
    ax = axes[0][1]
    ax.plot([r["step"] for r in val], [r["val_bpb"] for r in val], marker="o", label="val bpb")
    ax.set(title="pretraining: val bits per byte" + (" and CORE" if core else ""), xlabel="step", ylabel="bpb")
    if core:
        twin = ax.twinx()
        twin.plot([r["step"] for r in core], [r["core"] for r in core], marker="s", color="tab:green", label="CORE")
        twin.set_ylabel("CORE (bundle given to pretraining)")
        twin.legend(loc="center right")
    ax.legend(loc="upper center")
    ax = axes[1][0]
    if sft:
        ls = [r for r in sft if "loss" in r]
        ev = [r for r in sft if "eval_bpb" in r]
        ax.plot([r["step"] for r in ls], [r["loss"] for r in ls], label="train loss")
        twin = ax.twinx()
        twin.plot([r["step"] for r in ev], [r["eval_bpb"] for r in ev], marker="o", color="tab:orange",
                  label="val bpb")
        twin.set_ylabel("val bpb")
        twin.legend(loc="upper center")
        ax.legend(loc="upper right")
    ax.set(title="chat SFT", xlabel="step", ylabel="loss")
    ax = axes[1][1]
    rw = [r for r in rl if "reward" in r]
    if rw:
        ax.plot([r["step"] for r in rw], [r["reward"] for r in rw], alpha=0.4, label="mean reward")
        k = 5
        smooth = [sum(x["reward"] for x in rw[max(0, i - k + 1):i + 1]) / len(rw[max(0, i - k + 1):i + 1])
                  for i in range(len(rw))]
        ax.plot([r["step"] for r in rw], smooth, label=f"mean of {k}")
        ax.legend()
    ax.set(title="chat RL (GRPO): reward", xlabel="step", ylabel="reward")
    for a in axes.flat:
        a.grid(alpha=0.3)
    fig.suptitle(run.name)
    fig.tight_layout()
    out = run / "report" / "curves.png"
    out.parent.mkdir(exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="the speedrun's RUN_DIR (e.g. runs/speedrun-tiny)")
    args = p.parse_args(argv)
    if not Path(args.run_dir).is_dir():
        raise SystemExit(f"error: {args.run_dir} is not a directory (run bash recipes/speedrun.sh first)")
    out = write_report(args.run_dir)
    print(f"report: {out}")


if __name__ == "__main__":
    main()
