"""Every listed real model compresses to half its MACs, exactly, or fails as its allow-list
entry says (tests_zoo/known_failures.json: "source/name" -> status and reason).

A listed model that now does better, or fails differently, fails this test so that the list
only ever shrinks: update the entry (or delete it) in the same commit as the fix.
"""

from __future__ import annotations

import gc
import json
import signal
from pathlib import Path

import pytest
from conftest import RECORDS, write_results

from graphprune.testing.coverage import check_model
from graphprune.testing.real_zoos import zoo_specs

_KNOWN_FILE = json.loads((Path(__file__).parent / "known_failures.json").read_text())
KNOWN: dict[str, dict[str, str]] = _KNOWN_FILE["failures"]
SKIP_REASONS: dict[str, str] = _KNOWN_FILE.get("skipped", {})
PER_MODEL_SECONDS = 900

SPECS = [s for s in zoo_specs() if f"{s.source}/{s.name}" not in SKIP_REASONS]


def _alarm(signum, frame):
    raise TimeoutError(f"over {PER_MODEL_SECONDS} s")


@pytest.mark.parametrize("spec", SPECS, ids=[f"{s.source}/{s.name}" for s in SPECS])
def test_model(spec, request: pytest.FixtureRequest) -> None:
    key = f"{spec.source}/{spec.name}"
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(PER_MODEL_SECONDS)
    try:
        record = check_model(spec.name, spec.source, spec.build, spec.input_shape)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        gc.collect()
    RECORDS.append(record.to_dict())
    write_results(request.config)
    known = KNOWN.get(key)
    if record.status == "ok":
        assert known is None, f"{key} now passes: delete its entry from known_failures.json"
        return
    if record.status == "refused":  # an honest "cannot": it must say what blocks more
        assert "What limits pruning" in record.reason or "no prunable" in record.reason
    assert known is not None, f"{key}: {record.status}: {record.reason}"
    assert record.status == known["status"], (
        f"{key} was listed as {known['status']!r}, is now {record.status!r}: {record.reason}; "
        "update known_failures.json"
    )
    pytest.xfail(f"{record.status}: {known['reason']}")
