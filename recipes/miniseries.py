"""Miniseries (nanochat's runs/miniseries.sh): train a series of depths, each at its compute-optimal horizon from
the dial (ratio 12 by default), and tabulate params, tokens, val bpb and CORE.

    python recipes/miniseries.py --results-dir runs/miniseries \\
        --launcher "accelerate launch --config_file accelerate_configs/ddp_8gpu.yaml" \\
        -- --tokenizer runs/tokenizer --core-max-per-task -1

Flags after `--` go to recipes/pretrain.py for every run. Results: <results-dir>/results.csv (one row per run,
appended as runs finish; finished runs are skipped on restart), results.md and results.png.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from modeling_nanochat.pretrain.sweep import device_batch_for, split_passthrough, sweep, sweep_parser  # noqa: E402


def main(argv=None):
    ours, passthrough = split_passthrough(sys.argv[1:] if argv is None else argv)
    p = sweep_parser(__doc__, "runs/miniseries")
    p.add_argument("--depths", default="12,14,16,18,20,22,24,26", help="comma-separated depths")
    args = p.parse_args(ours)
    points = []
    for d in (int(x) for x in args.depths.split(",")):
        run_args = ["--depth", str(d), "--device-batch-size", device_batch_for(d), "--core-every", "999999",
                    "--sample-every", "-1", "--save-every", "-1", *passthrough]
        points.append((f"d{d}", run_args, None))
    sweep(points, Path(args.results_dir), args.launcher, "Miniseries: one model per depth", x="params_scaling",
          group=None)


if __name__ == "__main__":
    main()
