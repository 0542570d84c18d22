"""report.html: the run at a glance for a person: the latency-vs-fidelity front of the candidates tried, size and
latency of the original against the result, and the per-layer table. Plots are matplotlib PNGs embedded inline so
the file stands alone.
"""
from __future__ import annotations

import base64
import html
import io
from typing import Any


def _png(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def _figures(report: dict[str, Any]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figures = []
    candidates = [c for c in report.get("candidates", []) if c.get("fidelity") is not None]  # scored ones
    metric = report.get("fidelity_metric", "fidelity")
    if candidates:
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [c["latency_ms"] for c in candidates]
        ys = [c["fidelity"] for c in candidates]
        ax.scatter(xs, ys, c="tab:blue", label="candidates")
        chosen = [c for c in candidates if c.get("chosen")]
        if chosen:
            ax.scatter([c["latency_ms"] for c in chosen], [c["fidelity"] for c in chosen], c="tab:red", s=80,
                       marker="*", label="chosen")
        target = report.get("budget", {}).get("target_ms")
        if target:
            ax.axvline(target, color="gray", linestyle="--", label="budget")
        ax.set_xlabel("latency p50 (ms)" + ("" if report.get("latency_source") == "measured" else ", predicted"))
        ax.set_ylabel(metric)
        ax.set_title("candidates: latency vs fidelity")
        ax.legend()
        figures.append(("Latency vs fidelity", _png(fig)))
        plt.close(fig)
    original, result = report.get("original", {}), report.get("result", {})
    if original and result:
        fig, axes = plt.subplots(1, 2, figsize=(8, 3))
        for ax, key, label in ((axes[0], "latency_ms", "latency p50 (ms)"), (axes[1], "size_mb", "size (MB)")):
            values = [original.get(key, 0.0), result.get(key, 0.0)]
            ax.bar(["original", "compressed"], values, color=["tab:gray", "tab:green"])
            ax.set_title(label)
        figures.append(("Size and latency", _png(fig)))
        plt.close(fig)
    return figures


def render_html(report: dict[str, Any]) -> str:
    esc = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>deploy report</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#eee}"
             "td:first-child{text-align:left}</style></head><body>"]
    parts.append(f"<h1>deploy report: {esc(str(report.get('model', {}).get('path', '')))}</h1>")
    verdict = report.get("verdict")
    if verdict:
        colour = {"met": "#1a7f37", "uncertain": "#9a6700", "missed": "#cf222e"}[verdict]
        parts.append(f"<p style='font-size:1.4em;color:{colour}'><b>budget {esc(verdict)}</b> "
                     f"(exit {report.get('exit_code', 0)})</p>")
    summary = [("target", report.get("target", {}).get("name")), ("budget", report.get("budget", {}).get("described")),
               ("latency source", report.get("latency_source")), ("fidelity metric", report.get("fidelity_metric"))]
    for key in ("original", "result"):
        for field in ("latency_ms", "size_mb", "fidelity"):
            if field in report.get(key, {}):
                summary.append((f"{key} {field}", report[key][field]))
    parts.append("<table>" + "".join(f"<tr><th>{esc(str(k))}</th><td>{esc(str(v))}</td></tr>" for k, v in summary)
                 + "</table>")
    for warning in report.get("warnings", []):
        parts.append(f"<p style='color:#cf222e'><b>warning:</b> {esc(warning)}</p>")
    for title, png in _figures(report):
        parts.append(f"<h2>{esc(title)}</h2><img src='data:image/png;base64,{png}'>")
    layers = report.get("layers", [])
    if layers:
        columns = list(layers[0].keys())
        parts.append("<h2>Per layer</h2><table><tr>" + "".join(f"<th>{esc(c)}</th>" for c in columns) + "</tr>")
        for row in layers:
            parts.append("<tr>" + "".join(f"<td>{esc(str(row.get(c, '')))}</td>" for c in columns) + "</tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)
