"""synth-chat: questions about the synthetic world (modeling_nanochat/data/synthetic.py) answered in free text.

Not part of ChatCORE: it exists so the offline speedrun can show what chat SFT teaches a tiny model. Rows are
``{"question", "answer", "keyword"}`` (``answer`` is a reference reply, used as the SFT target elsewhere);
a response passes when ``keyword`` appears as a word in its first sentence, so a model that rambles through
many facts does not pass by luck. There is no Hub copy: ``--data DIR`` must hold ``synth_chat.jsonl``.
"""

from __future__ import annotations

import re

from .common import ChatTask, HubSource


def first_sentence(text: str) -> str:
    return re.split(r"[.!?\n]", text.strip(), maxsplit=1)[0]


class SynthChat(ChatTask):
    name, title = "synth_chat", "synth-chat"
    eval_type = "generative"
    baseline = 0.0
    source = HubSource("(none: python -m modeling_nanochat.data.synthetic writes it)", "synth_chat", "test")
    columns = ("question", "answer", "keyword")

    def __init__(self, data=None, source=None):
        if data is None:
            raise ValueError("synth_chat has no Hub copy: pass --data DIR holding synth_chat.jsonl (written by "
                             "python -m modeling_nanochat.data.synthetic --output-dir DIR, under DIR/chat_eval)")
        super().__init__(data, source)

    def conversation(self, row: dict) -> dict:
        return {"messages": [{"role": "user", "content": row["question"]},
                             {"role": "assistant", "content": row["answer"]}],
                "keyword": row["keyword"]}

    def evaluate(self, conversation: dict, response: str) -> bool:
        words = re.findall(r"[a-z-]+", first_sentence(response).lower())
        return conversation["keyword"].lower() in words
