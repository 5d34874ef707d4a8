"""nanochat's GSM8K grading, as plain functions (the `evaluate` module in gsm8k.py and the task both call these).

nanochat follows OpenAI's grade-school-math normalization: the answer is the first match of ``#### (-?[0-9.,]+)``
with commas removed, compared *as a string* with the reference's. Consequences kept on purpose, for comparable
numbers: "1,000" equals "1000"; "10." (a trailing sentence dot) does not equal "10"; "####10" (no space) or
"#### $10" has no answer; only the first "####" counts; and when neither side has an answer they are equal.
"""

from __future__ import annotations

import re

ANSWER = re.compile(r"#### (\-?[0-9\.\,]+)")
_CALL = re.compile(r"<<[^>]+>>")


def extract_answer(text: str) -> str | None:
    """The number after the first ``#### `` with commas removed, or None."""
    match = ANSWER.search(text)
    return match.group(1).strip().replace(",", "") if match else None


def reference_text(solution: str) -> str:
    """The last text part of a GSM8K solution (after its last ``<<...>>`` calculator call): nanochat reads the
    reference answer there, not in the whole solution."""
    return _CALL.split(solution)[-1]


def is_correct(prediction: str, reference: str) -> bool:
    """nanochat's GSM8K outcome: ``reference`` is a full solution or just its final text."""
    return extract_answer(prediction) == extract_answer(reference_text(reference))
