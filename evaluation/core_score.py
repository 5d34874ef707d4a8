"""CORE arithmetic: per-example correctness -> per-task accuracy -> centered accuracy -> CORE (their mean).

Plain functions with no heavy imports: `evaluation.core` calls them, and the `evaluate` module in
evaluation/metrics/core is a thin shell around them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


def centered_accuracy(accuracy: float, random_baseline: float) -> float:
    """0 at chance, 1 at perfect: (acc - 0.01 b) / (1 - 0.01 b), with the random baseline b in percent."""
    b = 0.01 * random_baseline
    if not 0 <= b < 1:
        raise ValueError(f"random baseline {random_baseline} is not a percentage in [0, 100)")
    return (accuracy - b) / (1.0 - b)


def core_summary(correct: Mapping[str, Iterable], random_baselines: Mapping[str, float]) -> dict:
    """``{"results": {task: {"accuracy", "centered"}}, "core": mean centered}`` from per-example correctness."""
    results = {}
    for task, flags in correct.items():
        flags = [bool(f) for f in flags]
        if not flags:
            raise ValueError(f"task {task!r} has no examples")
        if task not in random_baselines:
            raise ValueError(f"no random baseline for task {task!r} (have {sorted(random_baselines)})")
        accuracy = sum(flags) / len(flags)
        results[task] = {"accuracy": accuracy, "centered": centered_accuracy(accuracy, random_baselines[task])}
    if not results:
        raise ValueError("no tasks to summarize")
    return {"results": results, "core": sum(r["centered"] for r in results.values()) / len(results)}
