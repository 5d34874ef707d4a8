"""GSM8K (openai/gsm8k, config "main", test split): free-form answers with calculator calls, graded on `#### N`.

The reference solutions mark calculator use as ``<<expr=result>>``; the conversation turns each into a python call
(``expr``) and its forced output (``result``), the way the model is trained to use the tool. Grading is nanochat's:
the number after the first ``#### `` (commas dropped) must equal, as a string, the one in the reference's last text
part (evaluation/metrics/gsm8k/extraction.py).
"""

from __future__ import annotations

import re

from modeling_nanochat.utils.errors import DataError

from ..metrics.gsm8k.extraction import extract_answer, is_correct, reference_text
from .common import ChatTask, HubSource

_CALL = re.compile(r"(<<[^>]+>>)")


def solution_parts(answer: str) -> list[dict]:
    """A GSM8K solution as assistant parts: text, python (expression) and python_output (its result)."""
    parts = []
    for piece in _CALL.split(answer):
        if piece.startswith("<<") and piece.endswith(">>"):
            inner = piece[2:-2]
            expr, result = inner.rsplit("=", 1) if "=" in inner else (inner, "")  # no "=": no output
            parts += [{"type": "python", "text": expr}, {"type": "python_output", "text": result}]
        else:
            parts.append({"type": "text", "text": piece})
    return parts


class GSM8K(ChatTask):
    name, title = "gsm8k", "GSM8K"
    eval_type = "generative"
    baseline = 0.0
    source = HubSource("openai/gsm8k", "main", "test")
    columns = ("question", "answer")

    def check_rows(self, rows, locate) -> None:
        """Every reference solution must end in ``#### N``: grading (and the RL reward) reads the answer there, and
        a solution without it would score every answer wrong without a word."""
        for i, (question, answer) in enumerate(zip(rows["question"], rows["answer"])):
            if not isinstance(answer, str) or extract_answer(reference_text(answer)) is None:
                raise DataError(f"{locate(i)}: GSM8K answer has no final '#### <number>' line "
                                f"(it ends {str(answer)[-40:]!r}), so nothing can be graded against it",
                                "end every answer with '#### N' (N the final number), as openai/gsm8k does")
            if not isinstance(question, str) or not question.strip():
                raise DataError(f"{locate(i)}: GSM8K question is empty", "give every row its question")

    def conversation(self, row: dict) -> dict:
        return {"messages": [
            {"role": "user", "content": row["question"]},
            {"role": "assistant", "content": solution_parts(row["answer"])},
        ]}

    def evaluate(self, conversation: dict, response: str) -> bool:
        reference = conversation["messages"][-1]["content"][-1]["text"]  # the last text part holds "#### N"
        return is_correct(response, reference)
