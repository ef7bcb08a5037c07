"""Committed benchmark results say which code and which machine produced them."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = sorted((ROOT / "benchmarks" / "results").glob("*.json"))


@pytest.mark.parametrize("path", RESULTS, ids=lambda p: p.name)
def test_result_records_commit_and_machine(path):
    provenance = json.loads(path.read_text()).get("provenance")
    assert provenance, f"{path.name}: no 'provenance' (write it with benchmarks/provenance.describe())"
    assert re.fullmatch(r"[0-9a-f]{40}", provenance["commit"] or ""), f"{path.name}: commit {provenance['commit']!r}"
    machine = provenance["machine"]
    assert machine["cpu"] and machine["cores"] >= 1 and machine["accelerator"], f"{path.name}: machine {machine}"


def test_describe_reports_this_checkout():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import provenance
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    described = provenance.describe()
    assert described["machine"]["cores"] >= 1 and described["versions"]["jax"]
    if (ROOT / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{40}", described["commit"])
