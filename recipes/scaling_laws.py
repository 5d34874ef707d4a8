"""Scaling laws sweep (nanochat's runs/scaling_laws.sh): for each FLOP budget, train each depth for exactly that
many FLOPs (`--target-flops`, ratio -1) and record val bpb and CORE; the compute-optimal depth per budget is where
val bpb bottoms out.

    python recipes/scaling_laws.py --results-dir runs/scaling \\
        --launcher "accelerate launch --config_file accelerate_configs/ddp_8gpu.yaml" \\
        -- --tokenizer runs/tokenizer --eval-tokens 52428800 --core-max-per-task -1

Flags after `--` go to recipes/pretrain.py for every run. Results: <results-dir>/results.csv (one row per run,
appended as runs finish; finished runs are skipped on restart), results.md and results.png.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from modeling_nanochat.pretrain.sweep import device_batch_for, split_passthrough, sweep, sweep_parser  # noqa: E402


def main(argv=None):
    ours, passthrough = split_passthrough(sys.argv[1:] if argv is None else argv)
    p = sweep_parser(__doc__, "runs/scaling_laws")
    p.add_argument("--flops", default="1e18,2.15e18,4.64e18,1e19", help="comma-separated FLOP budgets")
    p.add_argument("--depths", default="10,12,14,16,18,20", help="comma-separated depths")
    args = p.parse_args(ours)
    points = []
    for flops in args.flops.split(","):
        for d in (int(x) for x in args.depths.split(",")):
            run_args = ["--depth", str(d), "--target-flops", flops, "--target-param-data-ratio", "-1",
                        "--device-batch-size", device_batch_for(d), "--core-every", "999999", "--sample-every", "-1",
                        "--save-every", "-1", *passthrough]
            points.append((f"flops{flops}_d{d}", run_args, float(flops)))
    sweep(points, Path(args.results_dir), args.launcher, "Scaling laws: val bpb at fixed FLOPs",
          x="params_scaling", group="target_flops")


if __name__ == "__main__":
    main()
