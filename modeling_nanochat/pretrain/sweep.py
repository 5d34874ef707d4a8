"""Sweeps of pretraining runs (nanochat's runs/scaling_laws.sh and runs/miniseries.sh) with a results table.

Each point is one `recipes/pretrain.py` run in its own output dir, started with the user's launcher (python,
`accelerate launch ...`). Results are read from the run's `run_config.json` and `metrics.jsonl` rather than grepped
from logs, appended to `results.csv` as each run finishes (a finished point is skipped when the sweep is started
again, so an interrupted sweep just continues), and summarised in `results.md` and `results.png`.
"""

from __future__ import annotations

import csv
import shlex
import subprocess
import sys
import time
from pathlib import Path

from modeling_nanochat.utils.plotting import pyplot
from modeling_nanochat.utils.run_files import read_json, read_metrics

PRETRAIN = Path(__file__).resolve().parents[2] / "recipes" / "pretrain.py"
COLUMNS = ("label", "depth", "target_flops", "model_dim", "params_total", "params_scaling", "params_wte",
           "params_value_embeds", "params_lm_head", "params_transformer", "params_scalars", "num_iterations",
           "total_batch_size", "tokens_trained", "param_data_ratio", "total_flops", "val_bpb", "core",
           "train_time_sec", "wall_time_sec", "output_dir")


def run_point(out_dir: Path, launcher: str, pretrain_args: list[str]) -> None:
    cmd = shlex.split(launcher) + [str(PRETRAIN), *pretrain_args, "--output-dir", str(out_dir)]
    print("$ " + shlex.join(cmd), flush=True)
    # --resume: a point that was interrupted continues from its last checkpoint instead of starting over
    subprocess.run(cmd + ["--resume"], check=True)


def collect(out_dir: Path, label: str, target_flops: float | None, wall: float) -> dict:
    cfg = read_json(out_dir / "run_config.json", required=True)
    plan = cfg["plan"]
    rows = read_metrics(out_dir / "metrics.jsonl")
    val = [r["val_bpb"] for r in rows if "val_bpb" in r]
    core = [r["core"] for r in rows if "core" in r]
    times = [r["total_training_time"] for r in rows if "total_training_time" in r]
    c = plan["param_counts"]
    config = read_json(out_dir / "config.json", required=True)
    return {
        "label": label, "depth": plan["depth"], "target_flops": target_flops if target_flops else "",
        "model_dim": config["hidden_size"], "params_total": c["total"], "params_scaling": plan["num_scaling_params"],
        "params_wte": c["wte"], "params_value_embeds": c["value_embeds"], "params_lm_head": c["lm_head"],
        "params_transformer": c["transformer_matrices"], "params_scalars": c["scalars"],
        "num_iterations": plan["num_iterations"], "total_batch_size": plan["total_batch_size"],
        "tokens_trained": plan["total_tokens"], "param_data_ratio": round(plan["total_tokens"] / plan["num_scaling_params"], 3),
        "total_flops": plan["total_flops"], "val_bpb": val[-1] if val else "", "core": core[-1] if core else "",
        "train_time_sec": round(times[-1], 1) if times else "", "wall_time_sec": round(wall, 1),
        "output_dir": str(out_dir),
    }


def done_labels(results_csv: Path) -> set[str]:
    if not results_csv.exists():
        return set()
    with open(results_csv) as f:
        return {row["label"] for row in csv.DictReader(f)}


def append_row(results_csv: Path, row: dict) -> None:
    new = not results_csv.exists()
    with open(results_csv, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        w.writerow(row)


def write_summary(results_dir: Path, title: str, x: str, group: str | None) -> None:
    """results.md (a markdown table) and results.png (val bpb and CORE against `x`, one line per `group`)."""
    with open(results_dir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    cols = [c for c in ("label", "depth", "target_flops", "params_total", "params_scaling", "num_iterations",
                        "tokens_trained", "param_data_ratio", "val_bpb", "core", "train_time_sec")]
    lines = [f"# {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r[c]) for c in cols) + " |")
    (results_dir / "results.md").write_text("\n".join(lines) + "\n")
    plt = pyplot("no results.png")
    if plt is None:
        return
    metrics = [m for m in ("val_bpb", "core") if any(r[m] for r in rows)]
    fig, axes = plt.subplots(1, max(1, len(metrics)), figsize=(6 * max(1, len(metrics)), 4), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        groups = sorted({r[group] for r in rows}) if group else [None]
        for g in groups:
            pts = sorted((float(r[x]), float(r[m])) for r in rows if r[m] and (g is None or r[group] == g))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{group}={g}" if g is not None else None)
        ax.set_xlabel(x)
        ax.set_ylabel(m)
        if x.startswith("params"):
            ax.set_xscale("log")
        if group:
            ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(results_dir / "results.png", dpi=120)


def _fmt(v: str) -> str:
    try:
        f = float(v)
    except ValueError:
        return v
    if f.is_integer() and abs(f) < 1e15:
        return f"{int(f):,}"
    return f"{f:.4g}"


def sweep(points: list[tuple[str, list[str], float | None]], results_dir: Path, launcher: str, title: str, x: str,
          group: str | None) -> Path:
    """Run each (label, pretrain args, target_flops) point not yet in results.csv, then summarise."""
    results_dir.mkdir(parents=True, exist_ok=True)
    done = done_labels(results_dir / "results.csv")
    for i, (label, args, flops) in enumerate(points):
        if label in done:
            print(f"[{i + 1}/{len(points)}] {label}: already in results.csv, skipped", flush=True)
            continue
        print(f"[{i + 1}/{len(points)}] {label}", flush=True)
        out = results_dir / label
        t0 = time.time()
        run_point(out, launcher, args)
        append_row(results_dir / "results.csv", collect(out, label, flops, time.time() - t0))
        write_summary(results_dir, title, x, group)
    write_summary(results_dir, title, x, group)
    print((results_dir / "results.md").read_text())
    return results_dir


def default_launcher() -> str:
    return shlex.quote(sys.executable)


def device_batch_for(depth: int) -> str:
    """nanochat's sweeps lower the device batch for deep models so they fit (a later flag overrides it)."""
    return "8" if depth >= 28 else "16" if depth >= 20 else "32"


def sweep_parser(doc: str, results_dir: str):
    """The flags every sweep recipe shares: where results go and how pretrain.py is started."""
    import argparse
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results-dir", default=results_dir)
    p.add_argument("--launcher", default=default_launcher(),
                   help="command that starts pretrain.py (default: this python; e.g. 'accelerate launch ...')")
    return p


def split_passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
    """Sweep flags before `--`, pretrain.py flags after it."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


__all__ = ["sweep", "sweep_parser", "default_launcher", "split_passthrough", "collect", "COLUMNS"]
