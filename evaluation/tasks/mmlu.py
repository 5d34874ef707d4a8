"""MMLU (cais/mmlu, config "all", test split): four choices A-D, graded by letter logits."""

from __future__ import annotations

from .common import ChatTask, HubSource, render_mc

LETTERS = ("A", "B", "C", "D")


class MMLU(ChatTask):
    name, title = "mmlu", "MMLU"
    eval_type = "categorical"
    baseline = 0.25
    source = HubSource("cais/mmlu", "all", "test")
    columns = ("question", "subject", "choices", "answer")

    def conversation(self, row: dict) -> dict:
        if len(row["choices"]) != 4 or row["answer"] not in range(4):
            raise ValueError(f"MMLU row {row['question'][:40]!r}: expected 4 choices and answer 0-3, got "
                             f"{len(row['choices'])} choices and answer {row['answer']!r}")
        return {
            "messages": [
                {"role": "user", "content": render_mc(row["question"], LETTERS, row["choices"])},
                {"role": "assistant", "content": LETTERS[row["answer"]]},
            ],
            "subject": row["subject"],
            "letters": LETTERS,
        }

    def evaluate(self, conversation: dict, response: str) -> bool:
        if response not in LETTERS:
            raise ValueError(f"MMLU answer {response!r} is not one of {LETTERS}")
        return response == conversation["messages"][-1]["content"]
