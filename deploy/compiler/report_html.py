"""report.html: a compress run at a glance. The verdict first (the CLI's word and exit code), the speed-up with its
interval and the fidelity against its floor; then where a person would rather look than read: the latency
distributions of the original and the result from the raw samples (or the predicted band, labelled as such), the
candidates the search measured (latency vs held-out fidelity, budget and floor lines, the chosen one), and each
layer's work, precision and pruning. Every number is shown with at most 4 significant digits."""
from __future__ import annotations

from typing import Any

from deploy.compiler.html_page import (VERDICT_COLOURS, esc, figure, ident, note, num, page, png, pyplot, table)

PRECISION_COLOURS = {"float": "#8c959f", "fp32": "#8c959f", "fp16": "#54aeff", "bf16": "#54aeff",
                     "int8": "#2da44e", "int4": "#bf8700", "removed": "#cf222e", "rank": "#8250df"}


def _headline(report: dict[str, Any]) -> list[str]:
    verdict, budget, result = report.get("verdict"), report.get("budget", {}), report.get("result", {})
    parts = []
    if verdict:
        parts.append(f"<p><span class='verdict' style='background:{VERDICT_COLOURS[verdict]}'>budget {esc(verdict)}"
                     f"</span> exit code {num(report.get('exit_code', 0))}</p>")
    elif budget.get("floor"):
        metric, minimum = budget["floor"]
        held = (result.get("fidelity") or 0.0) >= minimum
        colour = VERDICT_COLOURS["met" if held else "missed"]
        parts.append(f"<p><span class='verdict' style='background:{colour}'>floor {'held' if held else 'not held'}"
                     f"</span> {esc(metric)} at least {num(minimum)}; exit code {num(report.get('exit_code', 0))}</p>")
    key = [f"<div>speed-up<b>{_speedup(result)}</b>{_speedup_ci(result)}</div>",
           f"<div>{esc(report.get('fidelity_metric', 'fidelity'))} (held-out)<b class='{_fidelity_class(report)}'>"
           f"{num(result.get('fidelity'))}</b>floor {num(_floor_value(report))}{_held_out_note(report)}</div>",
           f"<div>latency p50<b>{num(result.get('latency_ms'), ' ms')}</b>{_latency_note(report)}</div>",
           f"<div>size<b>{num(result.get('size_mb'), ' MB')}</b>from {num(report.get('original', {}).get('size_mb'), ' MB')}"
           "</div>"]
    parts.append("<div class='key'>" + "".join(key) + "</div>")
    return parts


def _held_out_note(report: dict[str, Any]) -> str:
    data = report.get("data")
    return f", on {num(data['held_out'])} held-out samples" if data else ""


def _speedup(result: dict[str, Any]) -> str:
    return num(result.get("speedup"), "x") if result.get("speedup") else "n/a"


def _speedup_ci(result: dict[str, Any]) -> str:
    ci = result.get("speedup_ci")
    return f"95% CI {num(ci[0])}-{num(ci[1])}x, measured interleaved" if ci else "no interval (predicted)"


def _floor_value(report: dict[str, Any]) -> float:
    from deploy.compiler.budget import DEFAULT_FLOOR_VALUE

    floor = report.get("budget", {}).get("floor")
    return floor[1] if floor else DEFAULT_FLOOR_VALUE


def _fidelity_class(report: dict[str, Any]) -> str:
    value = report.get("result", {}).get("fidelity")
    return "good" if value is not None and value >= _floor_value(report) else "bad"


def _latency_note(report: dict[str, Any]) -> str:
    result = report.get("result", {})
    if report.get("latency_source") == "predicted":
        band = result.get("band_ms") or [None, None]
        label = result.get("latency_label") or "predicted"
        return f"predicted, band {num(band[0])}-{num(band[1])} ms ({esc(label)})"
    interval = result.get("interval_ms")
    return f"95% CI {num(interval[0])}-{num(interval[1])} ms" if interval else "measured"


def _summary(report: dict[str, Any]) -> str:
    o, r, budget = report.get("original", {}), report.get("result", {}), report.get("budget", {})
    target = report.get("target", {})
    rows = [("target", f"{ident(target.get('name'))} ({esc(target.get('runtime'))}, {num(target.get('threads'))} "
                       "threads)"),
            ("budget", esc(budget.get("described", ""))
             + (f": p50 at most {num(budget['target_ms'], ' ms')}" if budget.get("target_ms") else "")),
            ("latency", f"{num(o.get('latency_ms'), ' ms')} original, {num(r.get('latency_ms'), ' ms')} result "
                        f"({esc(report.get('latency_source'))})"),
            ("result precision", esc(r.get("precision"))),
            ("model", ident(report.get("model", {}).get("path")))]
    return table(None, rows)


def _distributions(report: dict[str, Any]) -> str | None:
    """Histograms of the raw samples (measured) or point and band (predicted) of the original and the result."""
    latency = report.get("latency", {})
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    if report.get("latency_source") == "measured":
        samples = {k: latency.get(k, {}).get("samples_ms") for k in ("original", "result")}
        if not all(samples.values()):
            plt.close(fig)
            return None
        import numpy as np

        every = np.concatenate([np.asarray(v) for v in samples.values()])
        low, high = np.percentile(every, 0.5), np.percentile(every, 99)
        bins = np.linspace(low, high, 50)
        for (name, values), colour in zip(samples.items(), ("tab:gray", "tab:green")):
            values = np.asarray(values)
            ax.hist(np.clip(values, low, high), bins=bins, alpha=0.55, color=colour, label=f"{name} ({len(values)} runs)")
            ax.axvline(float(np.median(values)), color=colour, linestyle="-", linewidth=2)
        ax.set_ylabel("runs")
        caption = "Latency distributions from the raw samples (vertical lines: p50; tails beyond p99 clipped)"
    else:
        for y, name, colour in ((1, "original", "tab:gray"), (0, "result", "tab:green")):
            entry = latency.get(name, {})
            point = entry.get("latency_ms")
            band = entry.get("band_ms") or [point, point]
            if point is None:
                continue
            ax.errorbar([point], [y], xerr=[[point - band[0]], [band[1] - point]], fmt="o", color=colour, capsize=6)
        ax.set_yticks([0, 1], ["result", "original"])
        label = report.get("result", {}).get("latency_label") or "predicted"
        caption = f"Predicted latency with its error band ({label})"
    target = report.get("budget", {}).get("target_ms")
    if target:
        ax.axvline(target, color="tab:red", linestyle="--", label="budget")
    ax.set_xlabel("latency (ms)")
    ax.legend(loc="upper right", fontsize=8)
    return figure(png(fig), caption)


def _candidates_plot(report: dict[str, Any]) -> str | None:
    scored = [c for c in report.get("candidates", []) if c.get("fidelity") is not None
              and c.get("latency_ms") not in (None, float("inf"))]
    if not scored:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [c["latency_ms"] for c in scored]
    ys = [c["fidelity"] for c in scored]
    errors = None
    if all(c.get("band_ms") for c in scored):  # predicted: the point estimate with its band
        xs = [c.get("predicted_ms") or c["latency_ms"] for c in scored]
        errors = [[x - c["band_ms"][0] for x, c in zip(xs, scored)], [c["band_ms"][1] - x for x, c in zip(xs, scored)]]
    ax.errorbar(xs, ys, xerr=errors, fmt="o", color="tab:blue", alpha=0.8, label="candidates measured")
    for x, y, c in zip(xs, ys, scored):
        if c.get("chosen"):
            ax.scatter([x], [y], s=260, marker="*", color="tab:red", zorder=5, label="chosen")
    target = report.get("budget", {}).get("target_ms")
    if target:
        ax.axvline(target, color="tab:red", linestyle="--", label="budget")
    ax.axhline(_floor_value(report), color="tab:orange", linestyle=":", label="fidelity floor")
    metric = report.get("fidelity_metric", "fidelity")
    source = "measured" if report.get("latency_source") == "measured" else "predicted"
    ax.set_xlabel(f"latency p50 (ms, {source})")
    ax.set_ylabel(f"{metric} (validation split)")
    ax.legend(fontsize=8)
    return figure(png(fig), f"The {len(scored)} candidates the search measured: latency vs {metric} of each exported "
                            "candidate on the validation split, before recovery (the search chooses on that split; "
                            "the result's number above is on the held-out split, after recovery)")


def _colour(precision: str) -> str:
    for key, colour in PRECISION_COLOURS.items():
        if key in str(precision):
            return colour
    return PRECISION_COLOURS["int8"] if "w8" in str(precision) or "a8" in str(precision) else "#0969da"


def _layers_plot(layers: list[dict[str, Any]]) -> str | None:
    shown = [row for row in layers if row.get("macs")][:120]
    if not shown:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.22 * len(shown)))
    ys = range(len(shown))
    ax.barh(ys, [r["macs"] for r in shown], color="#eaeef2", edgecolor="#8c959f", label="MACs before")
    ax.barh(ys, [r["macs_after"] for r in shown], color=[_colour(r["precision"]) for r in shown], height=0.5,
            label="MACs after (colour: precision)")
    ax.set_yticks(list(ys), [r["layer"] for r in shown], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("multiply-accumulates per inference")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in ("#8c959f", "#54aeff", "#2da44e", "#bf8700", "#8250df")]
    ax.legend(handles, ["float", "fp16/bf16", "int8", "int4", "low rank"], fontsize=7, loc="lower right")
    return figure(png(fig), "Per layer: work before (outline) and after pruning, coloured by the precision it runs in")


def _layer_table(layers: list[dict[str, Any]]) -> str:
    rows = []
    for row in layers:
        kept = row["macs_after"] / row["macs"] if row.get("macs") else None
        rows.append((esc(row["layer"]), esc(row["type"]), f"{num(row['params'])} &rarr; {num(row['params_after'])}",
                     f"{num(row['macs'])} &rarr; {num(row['macs_after'])}",
                     num(kept * 100, "%") if kept is not None else "", esc(row["precision"]),
                     num(row.get("latency_delta_ms"), " ms") if row.get("latency_delta_ms") is not None else ""))
    return table(("layer", "type", "parameters", "MACs", "work kept", "precision",
                  "latency change by precision (est.)"), rows)


def _candidate_table(report: dict[str, Any]) -> str:
    rows = []
    for c in report.get("candidates", []):
        removed = sum(c.get("removed", {}).values()) if c.get("removed") else 0
        star = "&#9733; " if c.get("chosen") else ""
        again = c.get("remeasured")  # near the budget: timed again, its p50 and the top of that interval
        p50 = f"p50 {num(again['p50_ms'], ' ms')}, " if again and again.get("p50_ms") is not None else ""
        latency = num(c.get("latency_ms"), " ms") + (f" (timed again: {p50}up to {num(again['interval_ms'][1], ' ms')})"
                                                      if again else "")
        rows.append((star + esc(c.get("origin", "")), esc(c.get("precision")), num(len(c.get("blocks") or ())),
                     num(c.get("level")), num(removed), latency, num(c.get("fidelity")),
                     num((c.get("trial") or {}).get("fidelity")), num(c.get("size_mb"), " MB")))
    return table(("candidate", "precision", "blocks dropped", "pruning level", "units removed", "latency p50",
                  "validation fidelity", "after trial recovery", "size"), rows)


def render_html(report: dict[str, Any]) -> str:
    path = report.get("model", {}).get("path") or "model"
    body = [f"<h1>deploy compress: {ident(str(path).rsplit('/', 1)[-1])}</h1>"]
    body += _headline(report)
    for warning in report.get("warnings", []):
        body.append(note(warning))
    if report.get("latency_source") == "predicted" and not report.get("result", {}).get("verified"):
        body.append(note("latency on this target is predicted, not measured: its band is not verified against "
                         "hardware", "info"))
    body.append(_summary(report))
    for title, part in (("Latency", _distributions(report)), ("Candidates", _candidates_plot(report))):
        if part:
            body += [f"<h2>{title}</h2>", part]
    if report.get("candidates"):
        body.append(_candidate_table(report))
    layers = report.get("layers", [])
    if layers:
        body.append("<h2>Per layer</h2>")
        plot = _layers_plot(layers)
        if plot:
            body.append(plot)
        body.append(_layer_table(layers))
    return page("deploy report", body)
