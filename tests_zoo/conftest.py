"""The real-zoo tier (``make test-zoo``): collects one record per model and, after every
model (so an interrupted run keeps what it measured), writes
benchmarks/results/zoo_coverage.json and COVERAGE.md (``--zoo-out=DIR`` to write them
elsewhere, ``--zoo-out=`` not at all)."""

from __future__ import annotations

import json
import platform
from datetime import date
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RECORDS: list[dict] = []
RESREP_RECORDS: list[dict] = []


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--zoo-out", default=str(ROOT), help="repository root to write results in")


def write_results(config: pytest.Config) -> None:
    out = config.getoption("--zoo-out")
    if out and RECORDS:
        render(Path(out), RECORDS)
    if out and RESREP_RECORDS:
        render_resrep(Path(out), RESREP_RECORDS)


def render(out: Path, records: list[dict]) -> None:
    """JSON and COVERAGE.md under the repository root ``out`` from zoo records."""
    import os

    from test_zoo import KNOWN, SKIP_REASONS

    from graphprune.testing.coverage_table import markdown
    from graphprune.testing.real_zoos import SKIPPED

    order = {r["source"]: i for i, r in enumerate(records)}
    records = sorted(records, key=lambda r: (order[r["source"]], r["name"]))
    results = out / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    meta = machine()
    (results / "zoo_coverage.json").write_text(
        json.dumps({"machine": meta, "records": records}, indent=1)
    )
    header = (
        "# Real-zoo coverage\n\n"
        '`compress(model, "magnitude", example_inputs=(x,), flops_target=0.5)` (round_to=8) on '
        "randomly initialised models at their default input size, batch 1. *reached*: remaining "
        "/ dense MACs counted by FlopCounterMode (conv + linear); *ok* means within 0.01 of the "
        "target, exact on a random plan (zero the planned-away channels, then prune: outputs "
        "equal, max relative error shown), every output shape kept and the user's model "
        "untouched. *prunable MACs*: share of the dense MACs in layers some prunable group "
        "shrinks. Known failures are listed in `tests_zoo/known_failures.json` with the reason "
        "shown here.\n\n"
        f"Produced by `make test-zoo ZOO={os.environ.get('GRAPHPRUNE_ZOO', 'ci')}` "
        f"on {meta['date']}, {meta['cpu']}, {meta['threads']} "
        f"threads, torch {meta['torch']}, {meta['libs']} (machine shared with other jobs: times "
        "are indicative)."
    )
    skipped = {**SKIPPED, **SKIP_REASONS}
    (out / "COVERAGE.md").write_text(markdown(records, skipped, KNOWN, header=header))


def render_resrep(out: Path, records: list[dict]) -> None:
    """benchmarks/results/zoo_resrep.json and ZOO_RESREP.md from ResRep records."""
    results = out / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    meta = machine()
    (results / "zoo_resrep.json").write_text(
        json.dumps({"machine": meta, "records": records}, indent=1)
    )
    lines = [
        "# ResRep on real zoos",
        "",
        "`tests_zoo/test_zoo_resrep.py` (`make test-zoo`): ResRep through its training hooks "
        "for 6 steps (batch 2 of random images; masks chosen at steps 1-3, masked rows zeroed "
        "from step 5) to 0.5 of the MACs, then finalize. *compactor* / *kernel*: groups whose "
        "rows are compactors (dense conv producers) / the group's own weights (depthwise-"
        "separable blocks, Linear producers, layer scales). *fold error*: max |finalized - "
        "trained| / max |trained| in eval mode. *ok*: fold error <= 1e-4 and the MACs within "
        "0.01 under the target (or as close as channel steps allow).",
        "",
        f"Produced on {meta['date']}, {meta['cpu']}, torch {meta['torch']}, {meta['libs']}.",
        "",
        "| model | status | compactor groups | kernel groups | reached | fold error | s | reason |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        reached = "" if r["reached"] is None else f"{r['reached']:.4f}"
        err = "" if r["fold_error"] is None else f"{r['fold_error']:.1e}"
        secs = "" if r["seconds"] is None else f"{r['seconds']:.1f}"
        reason = r["reason"].replace("|", "/")
        lines.append(
            f"| {r['source']}/{r['name']} | {r['status']} | {r['compactor_groups']} | "
            f"{r['kernel_groups']} | {reached} | {err} | {secs} | {reason} |"
        )
    (out / "ZOO_RESREP.md").write_text("\n".join(lines) + "\n")


def machine() -> dict:
    cpu = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    libs = []
    for name in ("torchvision", "timm", "ultralytics"):
        try:
            libs.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            pass
    return {
        "date": date.today().isoformat(),
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "libs": ", ".join(libs),
    }
