"""CORE as an `evaluate` metric: per-example correctness -> per-task accuracy -> centered accuracy -> CORE.

    import evaluate
    core = evaluate.load("evaluation/metrics/core")            # a local path: works offline
    core.compute(correct=[True, False, ...], task=["copa", "copa", ...], random_baselines={"copa": 50.0, ...})
    # {"results": {"copa": {"accuracy": 0.5, "centered": 0.0}, ...}, "core": ...}

A thin shell: the arithmetic is `evaluation.core_score.core_summary` (the nanochat-hf package must be importable),
the same function `python -m evaluation.core` reports with. Tasks keep the order of their first example.
"""

import datasets
import evaluate

from evaluation.core_score import core_summary

_DESCRIPTION = """CORE (DCLM; nanochat's base-model score): the accuracy of each in-context task is centered on its
random baseline, (acc - 0.01 b) / (1 - 0.01 b) with b in percent, and CORE is the mean centered accuracy over the
tasks."""

_KWARGS_DESCRIPTION = """
Args:
    correct (`list` of `bool`): whether the model answered each example right.
    task (`list` of `str`): the task label of each example.
    random_baselines (`dict` of `str` to `float`): each task's random baseline in percent (eval_meta_data.csv).
Returns:
    results (`dict`): per task, `accuracy` and `centered`.
    core (`float`): the mean centered accuracy.
"""

_CITATION = """@article{li2024datacomplm, title={DataComp-LM: In search of the next generation of training sets for
language models}, author={Li, Jeffrey and others}, journal={arXiv preprint arXiv:2406.11794}, year={2024}}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Core(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"correct": datasets.Value("bool"), "task": datasets.Value("string")}),
        )

    def _compute(self, correct, task, random_baselines=None):
        if random_baselines is None:
            raise ValueError("pass random_baselines={task: percent} (the bundle's eval_meta_data.csv)")
        by_task = {}
        for flag, label in zip(correct, task):
            by_task.setdefault(label, []).append(flag)
        return core_summary(by_task, random_baselines)
