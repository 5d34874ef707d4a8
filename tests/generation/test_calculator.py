"""The calculator tool: nanochat's results on its accepted expressions, quick refusals, and a thread-safe timeout."""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import FIXTURES

from modeling_nanochat.generation.calculator import use_calculator

FIXTURE = FIXTURES / "nanochat_calculator.json"
CASES = json.loads(FIXTURE.read_text())

ATTACKS = [
    "__import__('os').system('echo pwned')",
    "().__class__.__bases__[0].__subclasses__()",
    "'a'.__class__.__mro__",
    "'abc'.count('a').__class__",
    "'x'.upper.__self__.count('x')",
    "9**9**9**9",
    "2 ** 100000",
    "'a'.count('a') or open('/etc/passwd').read().count('r')",
    "[x for x in range(10**9)].count(1)",
    "sum(range(10**12))",
    "(lambda: [1 for _ in iter(int, 1)])().count(1)",
    "'a' * 10**10",
    "(" * 5000 + "1" + ")" * 5000,
    "-" * 20000 + "1",
    "9" * 4000 + "*" + "9" * 4000,
    "1+" * 4999 + "1" + "*" * 0,
    "globals().count('a')",
    "'abc'.count('a')\nimport os",
]


@pytest.mark.parametrize("case", CASES, ids=[c["expr"][:40] for c in CASES])
def test_same_result_as_nanochat(case):
    got = use_calculator(case["expr"])
    assert type(got).__name__ == case["type"]
    assert (repr(got) if case["type"] == "tuple" else got) == case["result"]


def test_fixture_covers_both_grammars():
    accepted = [c for c in CASES if c["result"] is not None]
    assert any(".count(" in c["expr"] for c in accepted) and any("/" in c["expr"] for c in accepted)
    assert len(CASES) - len(accepted) >= 15  # and refusals


def _refuse_all_quickly():
    slowest = 0.0
    for attack in ATTACKS:
        t0 = time.perf_counter()
        assert use_calculator(attack) is None, attack
        slowest = max(slowest, time.perf_counter() - t0)
    return slowest


# Refused by the grammar, not by running into the deadline (use_calculator's default timeout, 3 s): every attack
# must come back in well under it. Half the deadline, not less: each is refused within ~10 ms on a quiet machine,
# yet a run of tests/model + tests/generation once measured over 0.5 s for one of them (a pause outside the code).
REFUSED_WITHIN = 1.5


def test_injections_refused_quickly():
    assert _refuse_all_quickly() < REFUSED_WITHIN


def test_injections_refused_quickly_in_worker_thread():
    # Gradio and data loaders call tools from worker threads, where SIGALRM cannot be used
    with ThreadPoolExecutor(2) as pool:
        slowest = [f.result(timeout=30) for f in [pool.submit(_refuse_all_quickly) for _ in range(2)]]
    assert max(slowest) < REFUSED_WITHIN


def test_deadline_is_enforced_in_worker_thread():
    expr = "+".join(["12345*67890"] * 500)
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(use_calculator, expr).result() == 500 * 12345 * 67890
        assert pool.submit(use_calculator, expr, 0.0).result() is None  # no time left: refused, not hung


def test_long_sums_are_not_too_deep():
    assert use_calculator("+".join(["1"] * 1000)) == 1000  # Python's own parser gives up near 3000
    assert use_calculator("1,000 + 2,500") == 3500


def test_non_string_input():
    assert use_calculator(None) is None
    assert use_calculator(42) is None
