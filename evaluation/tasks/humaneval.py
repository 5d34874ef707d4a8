"""HumanEval (openai/openai_humaneval, test split): write a function, graded by running its tests in the sandbox.

The program run is nanochat's: the prompt's leading imports, the first fenced code block of the completion (or the
whole completion when there is none), the dataset's ``check`` function, and ``check(entry_point)``. It passes when
the process exits with status 0 (evaluation/sandbox.py says what the sandbox enforces).
"""

from __future__ import annotations

import re

from ..sandbox import execute_code
from .common import ChatTask, HubSource

_FENCE = re.compile(r"```(?:python)?\s*\n(.*?)\n```", re.DOTALL)


def prompt_imports(prompt: str) -> str:
    """The import lines at the top of ``prompt`` (comments and blank lines skipped, stop at the first other line)."""
    imports = []
    for line in prompt.split("\n"):
        line = line.strip()
        if line.startswith(("import ", "from ")):
            imports.append(line)
        elif line and not line.startswith("#"):
            break
    return "\n".join(imports)


def completion_code(completion: str) -> str:
    """The first ```python / ``` block of the completion, else the whole completion (stripped)."""
    blocks = _FENCE.findall(completion)
    return (blocks[0] if blocks else completion).strip()


def build_program(conversation: dict, completion: str) -> str:
    return (f"{prompt_imports(conversation['messages'][0]['content'])}\n\n{completion_code(completion)}\n\n"
            f"{conversation['test']}\ncheck({conversation['entry_point']})")


class HumanEval(ChatTask):
    name, title = "humaneval", "HumanEval"
    eval_type = "generative"
    baseline = 0.0
    source = HubSource("openai/openai_humaneval", "openai_humaneval", "test")
    columns = ("prompt", "canonical_solution", "test", "entry_point")

    def conversation(self, row: dict) -> dict:
        return {
            "messages": [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": f"{row['prompt']}\n{row['canonical_solution']}"},
            ],
            "entry_point": row["entry_point"],
            "test": row["test"],
        }

    def evaluate(self, conversation: dict, response: str) -> bool:
        return execute_code(build_program(conversation, response)).success
