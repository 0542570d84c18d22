"""How a bench result reads in a terminal: a table of latency statistics (one column per model) and, for
--compare, one sentence with the ratio, its confidence interval and the p-value."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from deploy.targets.bench import BenchResult
from deploy.targets.measure.loop import Measurement


def _ms(value: float) -> str:
    return f"{value:.3f} ms" if value < 100 else f"{value:.1f} ms"


def _column(m: Measurement) -> list[str]:
    s, rt = m.summary, m.runtime
    lo, hi = s["median_ci"]
    return [
        _ms(s["p50"]), _ms(s["p90"]), _ms(s["p95"]), _ms(s["p99"]), _ms(s["mean"]), _ms(s["std"]),
        f"{s['cov']:.1%}", f"{lo:.3f} - {hi:.3f} ms ({s['median_ci_confidence']:.0%})",
        f"{s['throughput_per_s']:,.1f} /s", str(s["n"]),
        f"{rt.get('runtime', '?')} {str(rt.get('version', '')).split('-')[0]}".strip(),
        str(rt.get("precision", "?")), str(rt.get("threads", "?")),
    ]


ROWS = ("p50", "p90", "p95", "p99", "mean", "std", "CoV", "median CI", "throughput", "samples", "runtime",
        "precision", "threads")


def bench_table(result: BenchResult) -> Any:
    """A rich Table: rows are statistics, columns the measured model(s)."""
    from rich.table import Table

    measurements = [result.measurement] + ([result.other] if result.other is not None else [])
    table = Table(title=f"latency on {result.measurement.target}")
    table.add_column("")
    for label, m in zip("AB", measurements):
        name = Path(m.model["path"]).name if m.model else "model"
        header = f"{label}: {name}" if len(measurements) > 1 else name
        table.add_column(header, justify="right", no_wrap=True, min_width=len(header))  # names are never cut
    columns = [_column(m) for m in measurements]
    for i, row in enumerate(ROWS):
        table.add_row(row, *(col[i] for col in columns))
    return table


def comparison_line(result: BenchResult) -> str:
    """'B / A median ratio 1.932 (95% CI 1.90 - 1.96 over 12 blocks: 1.93, ...), p = 0.0005: B is 93.2% slower'."""
    c = result.comparison
    if c is None:
        return ""
    if c.method == "blocks":
        spread = f" over {len(c.block_ratios)} blocks: {', '.join(f'{r:.3f}' for r in c.block_ratios)}"
        test = "sign test over blocks"
    else:
        spread, test = "", "Mann-Whitney"
    text = (f"B / A median ratio {c.ratio:.3f} ({c.confidence:.0%} CI {c.ci_low:.3f} - {c.ci_high:.3f}{spread}), "
            f"{test} p = {c.p_value:.2g}: ")
    if not c.excludes_one:
        return text + "no clear difference"
    return text + (f"B is {c.ratio - 1:.1%} slower" if c.ratio > 1 else f"B is {1 - c.ratio:.1%} faster")
