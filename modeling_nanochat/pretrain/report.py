"""A finished (or running) pretraining run as something to look at: `loss.png` and `summary.md` in its output dir.

    python -m modeling_nanochat.pretrain.report runs/d20      # any time, also while the run is going

Reads only `run_config.json` and `metrics.jsonl`, so it works on runs from other machines too.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from modeling_nanochat.utils.plotting import pyplot
from modeling_nanochat.utils.run_files import read_json, read_metrics


def _load(out_dir: Path):
    cfg = read_json(out_dir / "run_config.json", required=True)
    return cfg, read_metrics(out_dir / "metrics.jsonl")


def write_run_report(out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    cfg, rows = _load(out_dir)
    plan = cfg["plan"]
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_bpb" in r]
    core = [r for r in rows if "core" in r]
    timed = [r["tok_per_s"] for r in train[10:]] or [r["tok_per_s"] for r in train]
    mfus = [r["mfu"] for r in train[10:] if r.get("mfu") is not None]
    c = plan["param_counts"]
    lines = [
        f"# Pretraining run `{out_dir.name}`", "",
        "| setting | value |", "|---|---|",
        f"| depth / width | {plan['depth']} / {(read_json(out_dir / 'config.json') or {}).get('hidden_size', '?')} |",
        f"| parameters (scaling) | {c['total']:,} ({plan['num_scaling_params']:,}) |",
        f"| world size, optimizer | {cfg['world_size']} ({cfg['distributed_type']}), {cfg['optimizer']} |",
        f"| batch | {plan['total_batch_size']:,} tokens ({plan['device_batch_size']} x {plan['max_seq_len']} x "
        f"{plan['world_size']} x {plan['grad_accum_steps']} accum) |",
        f"| steps / tokens | {plan['num_iterations']:,} / {plan['total_tokens']:,} (ratio "
        f"{plan['total_tokens'] / plan['num_scaling_params']:.2f}) |",
        f"| FLOPs | {plan['total_flops']:.3e} |",
        f"| LRs (embedding, unembedding, matrix, scalar) | {plan['embedding_lr']:.4g}, {plan['unembedding_lr']:.4g}, "
        f"{plan['matrix_lr']:.4g}, {plan['scalar_lr']:.4g}; Muon wd {plan['weight_decay']:.4g} |",
        "", "| result | value |", "|---|---|",
        f"| steps done | {train[-1]['step'] + 1 if train else 0:,} |",
        f"| final train loss (smoothed) | {train[-1]['smooth_loss']:.4f} |" if train else "| final train loss | - |",
        f"| val bpb: last / min | {val[-1]['val_bpb']:.4f} / {min(r['val_bpb'] for r in val):.4f} |" if val else
        "| val bpb | not evaluated |",
        f"| CORE (last) | {core[-1]['core']:.4f} |" if core else "| CORE | not evaluated |",
        f"| median tok/s | {sorted(timed)[len(timed) // 2]:,.0f} |" if timed else "| tok/s | - |",
        f"| median MFU | {sorted(mfus)[len(mfus) // 2]:.1f}% |" if mfus else "| MFU | n/a (no known peak FLOPs) |",
        f"| training time | {(train[-1]['total_training_time'] / 60 if train else 0):.1f} min (after step 10) |",
    ]
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")
    plt = pyplot("summary.md only")
    if plt is None:
        return out_dir / "summary.md"
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    if train:
        axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], alpha=0.3, label="loss")
        axes[0].plot([r["step"] for r in train], [r["smooth_loss"] for r in train], label="loss (EMA)")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("train loss (nats/token)")
    axes[0].legend()
    if val:
        axes[1].plot([r["step"] for r in val], [r["val_bpb"] for r in val], marker="o")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("val bits per byte")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(out_dir.name)
    fig.tight_layout()
    fig.savefig(out_dir / "loss.png", dpi=120)
    plt.close(fig)
    return out_dir / "summary.md"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output_dir", help="a recipes/pretrain.py --output-dir")
    args = p.parse_args(argv)
    print(write_run_report(args.output_dir).read_text())


if __name__ == "__main__":
    main()
