"""The report card on a GPU-style run directory (real CORE, ChatCORE, time to GPT-2's CORE) — the code path the tiny
speedrun test does not reach — built from the files the stages write, in their formats."""

import json

from modeling_nanochat.apps.report_card import GPT2_CORE, write_report


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _chat(accuracies):
    results = {name: {"title": name, "accuracy": a, "centered": a, "passed": int(a * 100), "total": 100}
               for name, a in accuracies.items()}
    return {"results": results, "chatcore": 0.1234, "chatcore_cat": 0.2}


def test_gpu_run_report(tmp_path):
    run = tmp_path / "speedrun-d24"
    _write(run / "speedrun.json", {"preset": "d24", "depth": 24, "vocab_size": 32768, "run_rl": 0, "gpus": 8,
                                   "nproc": 8, "accelerate_config": "accelerate_configs/ddp_8gpu.yaml"})
    rows = [{"step": s, "loss": 4 - s / 1000, "smooth_loss": 4 - s / 1000, "tok_per_s": 1e6, "mfu": 50.0,
             "total_training_time": s * 0.5, "total_training_flops": s} for s in range(0, 3001, 500)]
    rows += [{"step": 1000, "val_bpb": 0.9}, {"step": 3000, "val_bpb": 0.75},
             {"step": 1000, "core": 0.2}, {"step": 2000, "core": GPT2_CORE + 0.001}, {"step": 3000, "core": 0.26}]
    (run / "base").mkdir(parents=True)
    (run / "base" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    core = {"results": {"arc_easy": {"accuracy": 0.7, "centered": 0.6}}, "core": 0.2601}
    _write(run / "eval" / "base.json", {"bpb": {"train": 0.74, "val": 0.75}, "core": {"core": core},
                                        "samples": [{"prompt": "The capital of France is",
                                                     "text": "The capital of France is Paris."}]})
    _write(run / "eval" / "sft.json", _chat({"arc_easy": 0.41, "arc_challenge": 0.32, "mmlu": 0.33, "gsm8k": 0.05,
                                             "humaneval": 0.07}))
    _write(run / "stages" / "pretrain.json", {"stage": "pretrain", "seconds": 3600.0, "attempts": 1})
    report = write_report(run).read_text()

    assert "| Metric | BASE | SFT |" in report and "| RL |" not in report.split("## Summary")[1].split("\n")[2]
    assert "| CORE | 0.2601 | - |" in report
    assert "| ARC-Easy | - | 0.4100 |" in report and "| HumanEval | - | 0.0700 |" in report
    assert "| ChatCORE | - | 0.1234 |" in report and "n/a offline" not in report
    assert "reached at step 2,000 after 16m40s of training" in report  # the first CORE >= 0.256525
    assert "| pretrain | 1h00m00s | 1 | $24.00 |" in report  # 8 GPUs x $3/h
    assert "Paris" in report and (run / "report" / "curves.png").exists()


def test_core_not_reached_and_missing_stages(tmp_path):
    run = tmp_path / "r"
    _write(run / "speedrun.json", {"preset": "d12", "depth": 12, "vocab_size": 32768, "run_rl": 1, "gpus": 1})
    _write(run / "eval" / "base.json", {"bpb": {}, "core": {"core": {"results": {}, "core": 0.15}}})
    report = write_report(run).read_text()
    assert "not reached (final CORE 0.1500)" in report
    assert "| GSM8K | - | - | - |" in report  # SFT and RL not run yet: "-", not "n/a offline"
