"""Quantize a trained nanochat after training, through transformers' `quantization_config`: the output dir is an
ordinary checkpoint that `AutoModelForCausalLM.from_pretrained(dir)`, the chat CLI and the app load as they are.

    python recipes/quantize.py --model runs/speedrun-tiny/sft --method torchao-int8-wo --output-dir runs/sft-int8
    python recipes/quantize.py --list        # every method, and whether it runs on this machine (and why not)

Methods: torchao-int8-wo, torchao-int8-dyn, torchao-int4-wo (torchao); quanto-int8, quanto-int4, quanto-fp8
(optimum-quanto); bnb-8bit, bnb-nf4 (bitsandbytes). Install them with `pip install -e '.[compress]'`. Whether one
runs here is found by trying it on a tiny model first (modeling_nanochat/compression/quantize.py); one that cannot
is a one-line error, as is one whose weights transformers cannot save (optimum-quanto: quantize at load time
instead). `--keep default` leaves the output head and the small gates in float (the embeddings are tables no
backend converts); `--keep none` quantizes every Linear. The output gets quantization.json: the method, what was
kept, and the bytes of the quantized matrices before and after.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

METHOD_NAMES = ("torchao-int8-wo", "torchao-int8-dyn", "torchao-int4-wo", "quanto-int8", "quanto-int4", "quanto-fp8",
                "bnb-8bit", "bnb-nf4")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model dir to quantize")
    p.add_argument("--method", choices=METHOD_NAMES)
    p.add_argument("--output-dir", help="where the quantized checkpoint goes")
    p.add_argument("--keep", default="default", choices=("default", "none"),
                   help="default: lm_head and the gates stay in float; none: quantize every Linear")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir (only once the new "
                                                            "one is complete)")
    p.add_argument("--list", action="store_true", help="list the methods and whether each runs here, then exit")
    args = p.parse_args(argv)
    if not args.list and not (args.model and args.method and args.output_dir):
        p.error("--model, --method and --output-dir are required (or --list)")
    return args


def main(argv=None):
    from modeling_nanochat.utils.errors import cli_run

    return cli_run(_main, argv)


def _main(argv=None):
    args = parse_args(argv)
    from modeling_nanochat.compression.quantize import METHODS, available, probe, quantize_model

    assert tuple(METHODS) == METHOD_NAMES, "recipes/quantize.py's --method choices must list METHODS"
    if args.list:
        rows = {}
        for m, (_, _, description) in METHODS.items():
            ok, reason = available(m)
            saved = ok and probe(m)["saveable"] and probe(m)["reload_exact"]
            rows[m] = {"available": ok, "saveable": saved, "reason": reason}
            state = "saves and reloads" if saved else ("load-time only" if ok else "n/a")
            print(f"{m:17s} {state:17s} {description}" + (f": {reason}" if reason else ""), flush=True)
        return rows
    record = quantize_model(args.model, args.method, args.output_dir, keep=args.keep, overwrite=args.overwrite)
    ratio = record["quantized_bytes_before"] / max(1, record["quantized_bytes_after"])
    print(json.dumps(record, indent=2))
    print(f"\n{args.method}: {record['quantized_modules']} Linear layers, {record['quantized_bytes_before']:,} -> "
          f"{record['quantized_bytes_after']:,} bytes ({ratio:.2f}x smaller); kept in float: "
          f"{', '.join(record['kept_modules']) or 'nothing'}\nload it: AutoModelForCausalLM.from_pretrained("
          f"{args.output_dir!r})")
    return record


if __name__ == "__main__":
    main()
