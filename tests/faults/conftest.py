"""The fault-injection suite: one fault per test, injected into a real run, checked on storage.

Each test records its figures (requests lost, duplicates, errors under load, recovery seconds) with
the session's ``fault_figures`` collector; at the end of the session the suite prints one line per
fault and merges them into benchmarks/results/faults.json (faults not run this time keep their last
figures, each with the date it was measured).
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import pytest

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "faults.json"


class FaultFigures:
    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}

    def record(self, fault: str, summary: str, **figures: Any) -> None:
        """``summary``: the one line printed for this fault; ``figures``: its numbers, as written to JSON."""
        self.rows[fault] = {"summary": summary, **figures, "measured": time.strftime("%Y-%m-%d %H:%M:%S")}

    def lines(self) -> list[str]:
        return [f"{fault}: {row['summary']}" for fault, row in self.rows.items()]

    def write(self, path: Path = RESULTS) -> None:
        old: dict[str, Any] = {}
        if path.exists():
            try:
                old = json.loads(path.read_text()).get("faults", {})
            except (OSError, ValueError):
                old = {}
        doc = {
            "faults": {**old, **self.rows},
            "machine": {"platform": platform.platform(), "python": platform.python_version(),
                        "cpus": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2)},
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=2) + "\n")


_COLLECTOR = FaultFigures()


@pytest.fixture(scope="session")
def fault_figures() -> FaultFigures:
    return _COLLECTOR


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.faults)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _COLLECTOR.rows:
        return
    terminalreporter.section("faults injected")
    for line in _COLLECTOR.lines():
        terminalreporter.write_line(line)
    _COLLECTOR.write()
    terminalreporter.write_line(f"figures written to {RESULTS.relative_to(RESULTS.parents[2])}")
