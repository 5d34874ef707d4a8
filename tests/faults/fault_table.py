"""The fault catalogue's table (hooks imported by tests/conftest.py): every test marked
`@pytest.mark.fault(area, fault)` is one row, printed after the run with its outcome (and the first line of what the
user was told, which the test records with `told`)."""

import re

import pytest

_ROWS = []


@pytest.fixture
def told(request):
    """`told(message)`: record what the user saw (the table shows its first line)."""
    def record(message: str) -> str:
        request.node.fault_told = (message or "").strip()
        return message
    return record


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    marker = item.get_closest_marker("fault")
    if marker is None or (report.when != "call" and report.passed):
        return
    area, name = marker.args
    told = getattr(item, "fault_told", "")
    first = next((line for line in told.splitlines() if line.strip()), "")
    first = re.sub(r"/\S*?/pytest-\d+/", "TMP/", first)  # pytest's temp dirs: long and different every run
    _ROWS.append((area, name, report.outcome if report.when == "call" else f"{report.outcome} ({report.when})",
                  first[:110]))


def pytest_terminal_summary(terminalreporter):
    if not _ROWS:
        return
    tr = terminalreporter
    tr.section(f"fault catalogue: {len(_ROWS)} faults")
    tr.write_line(f"| {'#':>2} | {'area':<12} | {'fault':<64} | {'outcome':<7} | what the user is told")
    for i, (area, name, outcome, first) in enumerate(_ROWS, 1):
        tr.write_line(f"| {i:>2} | {area:<12} | {name:<64} | {outcome:<7} | {first}")
    passed = sum(r[2] == "passed" for r in _ROWS)
    tr.write_line(f"{len(_ROWS)} faults: {passed} passed, {len(_ROWS) - passed} not")
