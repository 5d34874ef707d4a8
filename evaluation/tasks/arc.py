"""ARC-Easy / ARC-Challenge (allenai/ai2_arc, test split): multiple choice, graded by letter logits.

ARC questions carry their own labels (mostly A-D, some 1-4, three to five choices); the prompt and the allowed
answers use exactly those labels, as nanochat does.
"""

from __future__ import annotations

from .common import ChatTask, HubSource, render_mc


class ARC(ChatTask):
    eval_type = "categorical"
    baseline = 0.25  # nanochat's ChatCORE baseline (1 of 4), even for the rare 3- or 5-choice questions
    columns = ("question", "choices", "answerKey")

    def conversation(self, row: dict) -> dict:
        letters, choices = row["choices"]["label"], row["choices"]["text"]
        if row["answerKey"] not in letters:
            raise ValueError(f"ARC row {row.get('id', row['question'][:40])!r}: answerKey {row['answerKey']!r} "
                             f"is not one of its labels {letters}")
        return {
            "messages": [
                {"role": "user", "content": render_mc(row["question"], letters, choices)},
                {"role": "assistant", "content": row["answerKey"]},
            ],
            "letters": list(letters),  # the answer is read from the logits of these tokens only
        }

    def evaluate(self, conversation: dict, response: str) -> bool:
        if response not in conversation["letters"]:
            raise ValueError(f"ARC answer {response!r} is not one of {conversation['letters']}")
        return response == conversation["messages"][-1]["content"]


class ARCEasy(ARC):
    name, title = "arc_easy", "ARC-Easy"
    source = HubSource("allenai/ai2_arc", "ARC-Easy", "test")


class ARCChallenge(ARC):
    name, title = "arc_challenge", "ARC-Challenge"
    source = HubSource("allenai/ai2_arc", "ARC-Challenge", "test")
