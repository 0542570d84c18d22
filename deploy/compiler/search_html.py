"""The search's report.html and front.png: the latency-vs-fidelity front, labelled with the target, the latency's
source, the fidelity metric and the budget or floor, and a table of every trial (the front marked)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from deploy.compiler.html_page import esc, figure, ident, note, num, page, png, pyplot, table


def front_figure(summary: dict[str, Any]) -> Any:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    trials, front = summary["trials"], summary["front"]
    ax.scatter([t["latency_ms"] for t in trials], [t["fidelity"] for t in trials], c="tab:gray", label="trials")
    ax.plot([t["latency_ms"] for t in front], [t["fidelity"] for t in front], "o-", c="tab:red", label="Pareto front")
    target = summary.get("budget_ms")
    if target:
        ax.axvline(target, color="tab:red", linestyle="--", label="budget")
    if summary.get("floor") is not None:
        ax.axhline(summary["floor"], color="tab:orange", linestyle=":", label="fidelity floor")
    source = summary.get("latency_source", "measured")
    ax.set_xlabel(f"latency p50 (ms, {source} on {summary.get('target', 'the target')})")
    ax.set_ylabel(f"held-out {summary.get('fidelity_metric', 'fidelity')}")
    ax.set_title(f"deploy search on {summary.get('target', '')}: {summary.get('completed', len(trials))} trials")
    ax.legend(fontsize=8)
    return fig


def write_front_png(summary: dict[str, Any], path: Path) -> None:
    fig = front_figure(summary)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    pyplot().close(fig)


def render_search_html(summary: dict[str, Any]) -> str:
    metric = summary.get("fidelity_metric", "fidelity")
    body = [f"<h1>deploy search on {ident(summary.get('target', ''))}</h1>",
            f"<p>{num(summary.get('completed'))} trials completed, {num(summary.get('failed', 0))} failed; "
            f"{num(len(summary['front']))} on the front; latency {esc(summary.get('latency_source', 'measured'))}, "
            f"fidelity: held-out {esc(metric)}</p>"]
    if summary.get("latency_source") == "predicted":
        body.append(note("latency on this target is predicted, not measured: each point is the upper end of its "
                         "band, not verified against hardware", "info"))
    body.append(figure(png(front_figure(summary)), "Latency vs held-out fidelity of every trial; red: the front"))
    rows = []
    for t in sorted(summary["trials"], key=lambda r: r["latency_ms"]):
        params = t.get("params", {})
        rows.append((("&#9733; " if t.get("pareto") else "") + num(t["number"]), esc(params.get("precision", "")),
                     num(params.get("level")), num(params.get("mix")) if params.get("precision") == "mixed" else "",
                     num(t["latency_ms"], " ms"),
                     num(t["fidelity"]), num(t.get("details", {}).get("size_mb"), " MB"),
                     ident(Path(t["artifact"]).name) if t.get("artifact") else ""))
    body.append("<h2>Trials</h2>" + table(("trial (star: on the front)", "precision", "pruning level", "mix",
                                           "latency p50", metric, "size", "folder"), rows))
    return page("deploy search", body)
