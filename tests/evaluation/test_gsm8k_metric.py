"""The GSM8K `evaluate` module grades as nanochat does: reference solutions pass, perturbed ones fail, and every
edge case (commas, signs, trailing dots, missing or repeated ####) gets nanochat's own verdict (golden grid made
by running nanochat's extract_answer / GSM8K.evaluate, tests/fixtures/README.md)."""

import json
import re
import subprocess
import sys

import pytest
from conftest import FIXTURES, REPO, clean_env, shared_path

from evaluation.metrics.gsm8k.extraction import extract_answer, is_correct, reference_text

METRIC = str(REPO / "evaluation" / "metrics" / "gsm8k")
GOLDEN = json.loads((FIXTURES / "nanochat_chat_eval" / "golden.json").read_text())["gsm8k_grading"]


@pytest.fixture(scope="module")
def metric():
    import evaluate

    return evaluate.load(METRIC)


@pytest.fixture(scope="module")
def solutions():
    rows = [json.loads(line) for line in shared_path("gsm8k", "train_sample.jsonl").read_text().splitlines()]
    assert len(rows) >= 20
    return [r["answer"] for r in rows]


def test_reference_solutions_score_100(metric, solutions):
    out = metric.compute(predictions=solutions, references=solutions)
    assert out["accuracy"] == 1.0 and out["correct"] == [1] * len(solutions)
    # the final line alone is enough, and so is the answer inside a tool-using completion
    finals = [s.splitlines()[-1] for s in solutions]
    assert metric.compute(predictions=[f"<|python_start|>1+1<|python_end|>ok {f}" for f in finals],
                          references=solutions)["accuracy"] == 1.0


def _bump(solution):
    """The same solution with its final answer changed by one."""
    number = extract_answer(solution)
    assert number is not None, solution
    wrong = str(int(float(number)) + 1) if float(number).is_integer() else number + "1"
    return re.sub(r"#### .*$", f"#### {wrong}", solution, flags=re.S)


@pytest.mark.parametrize("perturb", [
    _bump,
    lambda s: s.replace("#### ", "The answer is "),  # no marker: no answer
    lambda s: s.replace("#### ", "#### $"),  # a currency sign before the number is not a number
    lambda s: re.sub(r"#### (\S+)", r"#### \1.", s),  # a trailing dot is part of the string compared
], ids=["answer+1", "no-marker", "dollar", "trailing-dot"])
def test_perturbed_solutions_score_0(metric, solutions, perturb):
    perturbed = [perturb(s) for s in solutions]
    assert all(p != s for p, s in zip(perturbed, solutions))
    out = metric.compute(predictions=perturbed, references=solutions)
    assert out["accuracy"] == 0.0, [p for p, c in zip(perturbed, out["correct"]) if c]


def test_extraction_matches_nanochat():
    assert [extract_answer(p) for p in GOLDEN["predictions"]] == GOLDEN["extract_predictions"]
    assert [extract_answer(reference_text(r)) for r in GOLDEN["references"]] == GOLDEN["extract_references"]
    # the grid covers what the issue lists: commas, negatives, trailing dot, missing and repeated ####
    extracted = dict(zip(GOLDEN["predictions"], GOLDEN["extract_predictions"]))
    assert extracted["#### 1,000"] == "1000" and extracted["#### -5"] == "-5" and extracted["#### 10."] == "10."
    assert extracted["####10"] is None and extracted["#### 5\n#### 10"] == "5"


def test_grading_grid_matches_nanochat(metric):
    refs, preds, grid = GOLDEN["references"], GOLDEN["predictions"], GOLDEN["correct"]
    ours = [[int(is_correct(p, r)) for p in preds] for r in refs]
    assert ours == grid
    pairs = [(p, r) for r in refs for p in preds]
    out = metric.compute(predictions=[p for p, _ in pairs], references=[r for _, r in pairs])
    assert out["correct"] == [c for row in grid for c in row]
    # nanochat's quirk kept: no answer on either side counts as equal
    no_marker = refs.index("no marker here")
    assert grid[no_marker][preds.index("The answer is 10")] == 1


def test_metric_rejects_empty(metric):
    with pytest.raises(ValueError, match="no predictions"):
        metric.compute(predictions=[], references=[])


@pytest.mark.slow
def test_metric_loads_offline_in_a_fresh_process(tmp_path):
    code = ("import evaluate\n"
            f"m = evaluate.load({METRIC!r})\n"
            "print(m.compute(predictions=['#### 1,000'], references=['#### 1000'])['accuracy'])\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=clean_env(HF_EVALUATE_OFFLINE="1", HF_DATASETS_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "1.0"
