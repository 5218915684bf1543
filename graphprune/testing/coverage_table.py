"""COVERAGE.md from zoo records: totals per source, then one row per model."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence

_HEADER = (
    "| source | model | input | status | traced | groups (prunable) | prunable MACs "
    "| reached | exact | shapes | untouched | trace+analyze+compress (s) | why |"
)


def _f(v: object, spec: str = ".3f") -> str:
    return "—" if v is None else format(v, spec)


def _yn(v: object) -> str:
    return "—" if v is None else ("yes" if v else "**no**")


def _why(r: Mapping[str, object], known: Mapping[str, Mapping[str, str]]) -> str:
    key = f"{r['source']}/{r['name']}"
    text = known.get(key, {}).get("reason") or r.get("reason") or ""
    return str(text).replace("|", "\\|").replace("\n", " ")[:300]


def totals(records: Sequence[Mapping[str, object]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for r in records:
        t = out.setdefault(str(r["source"]), {"models": 0})
        t["models"] += 1
        t[str(r["status"])] = t.get(str(r["status"]), 0) + 1
    return out


def markdown(
    records: Sequence[Mapping[str, object]],
    skipped: Mapping[str, str],
    known: Mapping[str, Mapping[str, str]],
    *,
    header: str,
) -> str:
    """The whole COVERAGE.md text. ``known`` is the allow-list (model key -> status, reason)."""
    lines = [header, "", "| source | models | ok | refused (PlanError) | other failures |"]
    lines.append("|---|---|---|---|---|")
    for source, t in totals(records).items():
        bad = {k: v for k, v in t.items() if k not in ("models", "ok", "refused")}
        other = ", ".join(f"{v} {k}" for k, v in sorted(bad.items())) or "0"
        lines.append(
            f"| {source} | {t['models']} | {t.get('ok', 0)} | {t.get('refused', 0)} | {other} |"
        )
    times = [sum(r[k] or 0 for k in ("trace_s", "analyze_s", "compress_s")) for r in records]
    if times:
        lines += [
            "",
            f"Median trace+analyze+compress time per model: {statistics.median(times):.1f} s.",
        ]
    lines += ["", _HEADER, "|" + "---|" * (_HEADER.count("|") - 1)]
    for r in records:
        t = sum(r[k] or 0 for k in ("trace_s", "analyze_s", "compress_s"))
        shape = "x".join(str(d) for d in r["input_shape"][1:])
        traced = str(r["traced"] or "failed").replace("|", "\\|")
        if len(traced) > 120:
            traced = traced[:117] + "..."
        lines.append(
            f"| {r['source']} | {r['name']} | {shape} | {r['status']} | {traced} "
            f"| {r['groups']} ({r['prunable_groups']}) | {_f(r['prunable_macs_share'], '.0%')} "
            f"| {_f(r['reached'])} | {_f(r['exact_error'], '.0e')} | {_yn(r['shapes_kept'])} "
            f"| {_yn(r['untouched'])} | {t:.1f} | {_why(r, known)} |"
        )
    if skipped:
        lines += ["", "Skipped (not run):", ""]
        lines += [f"- {k}: {v}" for k, v in sorted(skipped.items())]
    return "\n".join(lines) + "\n"
