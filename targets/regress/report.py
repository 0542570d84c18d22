"""What the gate tells a CI system: a markdown summary and JUnit XML, both rendered from the result's JSON dict
(`RegressResult.to_dict()`), so the three outputs can never disagree.

JUnit: one testcase; a regression is a <failure>, an inconclusive run a <skipped> (it was not judged: rerun),
a pass or a baseline update has neither.
"""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

STEP_SUMMARY_ENV = "GITHUB_STEP_SUMMARY"
_LABELS = {"pass": "PASS", "regression": "REGRESSION", "inconclusive": "INCONCLUSIVE", "updated": "BASELINE UPDATED"}


def _ms(value: Any) -> str:
    return "-" if value is None else f"{float(value):.3f}"


def _pct(value: Any) -> str:
    return "-" if value is None else f"{float(value):.1%}"


def headline(result: dict[str, Any]) -> str:
    """One line: outcome, model, and the change of the median."""
    label = _LABELS.get(result["outcome"], result["outcome"].upper())
    verdict = result.get("verdict") or {}
    if verdict.get("improvement"):
        label += " (improvement)"
    name = Path(result["model"]["path"]).name
    change = verdict.get("change_pct")
    tail = "" if change is None else f": median {change:+.1f}% (x{verdict['ratio']:.3f}), p = {verdict['p_value']:.2g}"
    return f"{label} {name}{tail}"


def _numbers_table(result: dict[str, Any]) -> list[str]:
    old, new = (result.get(k) or {} for k in ("old", "new"))
    so, sn = old.get("summary") or {}, new.get("summary") or {}
    rows = [("samples", so.get("n", "-"), sn.get("n", "-")), ("median (ms)", _ms(so.get("p50")), _ms(sn.get("p50"))),
            ("p90 (ms)", _ms(so.get("p90")), _ms(sn.get("p90"))), ("CoV", _pct(so.get("cov")), _pct(sn.get("cov")))]
    verdict = result.get("verdict") or {}
    if verdict:
        rows.append(("robust CoV (gated)", _pct(verdict.get("noise_old")), _pct(verdict.get("noise_new"))))
    lines = [f"| | {'baseline model' if result['mode'] == 'interleaved' else 'baseline file'} | new |", "|---|---:|---:|"]
    return lines + [f"| {a} | {b} | {c} |" for a, b, c in rows]


def to_markdown(result: dict[str, Any]) -> str:
    """A short section for a PR or a job summary: verdict, numbers side by side, the rule, reasons and warnings."""
    lines = [f"### Latency gate: {headline(result)}", ""]
    verdict, gate = result.get("verdict"), result["gate"]
    if result["outcome"] == "updated":
        lines += [f"Baseline `{result['baseline']}` written from a fresh measurement of `{result['model']['path']}`.", ""]
    lines += _numbers_table(result) + [""]
    if verdict and verdict.get("ratio") is not None:
        lo, hi = verdict["ci"]
        blocks = ((result.get("new") or {}).get("structure") or {}).get("blocks") or []
        how = (f"{len(blocks)} blocks with fresh sessions; sign test over blocks" if len(blocks) > 1 else
               "Mann-Whitney")
        lines.append(f"Ratio of medians new/old **x{verdict['ratio']:.3f}** ({gate['confidence']:.0%} CI {lo:.3f} - "
                     f"{hi:.3f}), {how} p = {verdict['p_value']:.2g}.")
    lines.append(f"Rule: regression when the median is more than {gate['threshold']:.0%} slower AND p < "
                 f"{gate['alpha']:g}; inconclusive when a robust CoV > {gate['max_cov']:.0%}, fewer than "
                 f"{gate['min_samples']} samples, or a CI that reaches past twice the threshold. "
                 f"Mode: {result['mode']}.")
    for reason in (verdict or {}).get("reasons", []):
        lines.append(f"- {reason}")
    if verdict and verdict.get("hint"):
        lines.append(f"- what to do: {verdict['hint']}")
    for warning in result.get("warnings", []):
        lines.append(f"- warning: {warning}")
    return "\n".join(lines).rstrip() + "\n"


def to_junit(result: dict[str, Any]) -> str:
    """JUnit XML with one testcase named after the model."""
    outcome = result["outcome"]
    seconds = f"{float(result.get('seconds', 0.0)):.3f}"
    failures, skipped = int(outcome == "regression"), int(outcome == "inconclusive")
    suites = ET.Element("testsuites", name="deploy regress", tests="1", failures=str(failures), errors="0",
                        skipped=str(skipped), time=seconds)
    suite = ET.SubElement(suites, "testsuite", name="deploy.regress", tests="1", failures=str(failures), errors="0",
                          skipped=str(skipped), time=seconds)
    case = ET.SubElement(suite, "testcase", classname="deploy.regress",
                         name=f"latency {Path(result['model']['path']).name}", time=seconds)
    details = to_markdown(result)
    if outcome == "regression":
        ET.SubElement(case, "failure", message=headline(result), type="regression").text = details
    elif outcome == "inconclusive":
        ET.SubElement(case, "skipped", message=f"{headline(result)}; rerun").text = details
    ET.SubElement(case, "system-out").text = details
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def append_step_summary(markdown: str) -> Path | None:
    """Append to the file GitHub Actions names in $GITHUB_STEP_SUMMARY (no-op elsewhere)."""
    target = os.environ.get(STEP_SUMMARY_ENV)
    if not target:
        return None
    with open(target, "a", encoding="utf-8") as handle:
        handle.write(markdown if markdown.endswith("\n") else markdown + "\n")
    return Path(target)
