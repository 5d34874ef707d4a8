"""GSM8K accuracy as nanochat grades it, as an `evaluate` module: ``evaluate.load("evaluation/metrics/gsm8k")``.

Works offline (a local module needs no download). The grading itself is in extraction.py, which `evaluate` copies
next to this script.
"""

import datasets
import evaluate

from .extraction import is_correct

_DESCRIPTION = """nanochat's GSM8K grading: the number after the first "#### " (commas removed) in the prediction must
equal, as a string, the one in the reference solution's final text (after its last <<...>> calculator call)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: model completions (str).
    references: GSM8K reference solutions (the dataset's `answer` field), or just their final "#### N" line.
Returns:
    accuracy: fraction of predictions graded correct.
    correct: per example, 1 if correct else 0.
Example:
    >>> metric = evaluate.load("evaluation/metrics/gsm8k")
    >>> metric.compute(predictions=["so #### 1,000"], references=["10*100 = <<10*100=1000>>1000\\n#### 1000"])
    {'accuracy': 1.0, 'correct': [1]}
"""

_CITATION = """@article{cobbe2021gsm8k, title={Training Verifiers to Solve Math Word Problems},
author={Cobbe, Karl and others}, journal={arXiv preprint arXiv:2110.14168}, year={2021}}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Gsm8k(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        if not predictions:
            raise ValueError("gsm8k: no predictions to grade")
        correct = [int(is_correct(p, r)) for p, r in zip(predictions, references)]
        return {"accuracy": sum(correct) / len(correct), "correct": correct}
