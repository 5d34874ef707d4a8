"""The lab's report: Pareto fronts, n/a rows for methods this machine cannot run, the plot file."""

import os

from modeling_nanochat.compression.report import pareto_front, write


def _rows():
    return [
        {"name": "fp32", "kind": "fp32", "disk_bytes": 16e6, "decode_tok_s_b1": 200.0, "val_bpb": 1.00},
        {"name": "int8", "kind": "quantized", "disk_bytes": 7e6, "decode_tok_s_b1": 150.0, "val_bpb": 1.01},
        {"name": "worse", "kind": "quantized", "disk_bytes": 8e6, "decode_tok_s_b1": 100.0, "val_bpb": 1.20},
        {"name": "small", "kind": "pruned", "disk_bytes": 5e6, "decode_tok_s_b1": 260.0, "val_bpb": 1.30},
        {"name": "student", "kind": "distilled", "group": "base", "disk_bytes": 30e6, "decode_tok_s_b1": 10.0,
         "val_bpb": 0.5},
        {"name": "int4", "kind": "quantized", "unavailable": "torchao int4 weight-only has no CPU kernel"},
    ]


def test_pareto_front_keeps_exactly_the_undominated_rows():
    rows = [r for r in _rows() if r["name"] != "student"]
    assert pareto_front(rows, "disk_bytes", "val_bpb", True) == ["fp32", "int8", "small"]
    for r in rows:
        if "decode_tok_s_b1" in r:
            r["lat"] = 1 / r["decode_tok_s_b1"]
    assert pareto_front(rows, "lat", "val_bpb", True) == ["fp32", "small"]
    # higher-is-better quality (accuracy) flips the comparison
    acc = [{"name": "a", "size": 1, "acc": 0.5}, {"name": "b", "size": 2, "acc": 0.4}, {"name": "c", "size": 3,
                                                                                     "acc": 0.9}]
    assert pareto_front(acc, "size", "acc", False) == ["a", "c"]


def test_report_files_mark_fronts_and_unavailable_methods(tmp_path):
    meta = {"model": "m", "machine": "test box", "repeats": 3, "prompt_len": 128, "new_tokens": 32,
            "memory_kind": "CPU resident"}
    out = write(_rows(), meta, str(tmp_path))
    md = (tmp_path / "compression.md").read_text()
    assert out["markdown"] == md and "test box" in md
    assert out["fronts"]["chat"]["quality"] == "val_bpb" and out["fronts"]["base"]["quality"] == "val_bpb"
    line = {row.split("|")[1].strip(): row for row in md.splitlines() if row.startswith("| ")}
    assert line["int8"].rstrip(" |").endswith("S") and line["small"].rstrip(" |").endswith("SL")
    assert "| worse |" in md and not line["worse"].rstrip(" |").endswith(("S", "L"))
    assert line["int4"].count("n/a") >= 10
    assert "**int4**: torchao int4 weight-only has no CPU kernel" in md
    # a base model is compared only with base models: alone in its group, it is on both of its fronts
    assert out["fronts"]["base"]["size"] == ["student"] and "student" not in out["fronts"]["chat"]["size"]
    assert md.index("## Chat models") < md.index("| fp32 |") < md.index("## Base models") < md.index("| student |")
    # chat models with synth-chat measured are ranked by it (higher is better)
    chat = [dict(r, synth_chat=acc) for r, acc in zip(_rows()[:4], (0.9, 0.9, 0.95, 0.1))]
    fronts = write(chat, meta, str(tmp_path / "acc"))["fronts"]["chat"]
    assert fronts["quality"] == "synth_chat" and fronts["size"] == ["int8", "worse", "small"]
    assert out["plot"] and os.path.getsize(tmp_path / "compression.png") > 1000
