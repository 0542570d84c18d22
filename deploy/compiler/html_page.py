"""What every HTML report shares: numbers a person can read (at most 4 significant digits, big counts as k/M/G),
plots as inline PNGs (the file stands alone), tables, coloured notes, and a page that marks each image it could
draw (data-loaded), so a headless browser can check that none is broken."""
from __future__ import annotations

import base64
import html
import io
import math
from typing import Any, Iterable, Sequence

VERDICT_COLOURS = {"met": "#1a7f37", "uncertain": "#9a6700", "missed": "#cf222e"}
STYLE = ("body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#1f2328;padding:0 1em}"
         "table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #d0d7de;padding:3px 8px;"
         "text-align:right;white-space:nowrap}th{background:#f6f8fa}td:first-child,th:first-child{text-align:left;white-space:normal}"
         ".verdict{font-size:1.5em;padding:0.4em 0.8em;border-radius:6px;color:#fff;display:inline-block}"
         ".note{padding:0.5em 0.8em;border-left:4px solid;margin:0.4em 0}"
         ".warning{border-color:#cf222e;background:#ffebe9}.info{border-color:#9a6700;background:#fff8c5}"
         ".good{color:#1a7f37}.bad{color:#cf222e}.key{display:flex;gap:2em;flex-wrap:wrap;margin:1em 0}"
         ".key div{font-size:1.1em}.key b{display:block;font-size:1.6em}code.id{font-size:0.9em;color:#57606a}"
         "figure{margin:1em 0}figcaption{color:#57606a;font-size:0.9em}")
# After load, each image says whether it decoded (a test in a headless browser reads the attribute).
MARK_IMAGES = ("<script>window.addEventListener('load',function(){document.querySelectorAll('img').forEach("
               "function(i){i.setAttribute('data-loaded',String(i.complete&&i.naturalWidth>0))});"
               "document.body.setAttribute('data-ready','true')});</script>")


def esc(value: Any) -> str:
    return html.escape(str(value))


def num(value: Any, unit: str = "") -> str:
    """A number as a person reads it: 4 significant digits at most, counts of 10,000 and more as k/M/G."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            return "n/a" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        magnitude = abs(value)
        for scale, suffix in ((1e9, " G"), (1e6, " M"), (1e4, " k")):
            if magnitude >= scale:
                shown = value / (scale if suffix != " k" else 1e3)
                return f"{shown:.4g}{suffix}{unit}"
        text = str(value) if isinstance(value, int) else f"{value:.4g}"
        return text + unit
    return esc(value)


def ident(value: Any) -> str:
    """A path, hash or version: shown whole, in code type, and never counted as a number."""
    return f"<code class='id'>{esc(value)}</code>"


def table(header: Sequence[str] | None, rows: Iterable[Sequence[str]]) -> str:
    """Cells are already HTML (num/esc/ident); no header row when `header` is None."""
    head = "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def note(text: str, kind: str = "warning") -> str:
    label = "warning" if kind == "warning" else "note"
    return f"<div class='note {kind}'><b>{label}:</b> {esc(text)}</div>"


def figure(png: str, caption: str) -> str:
    return (f"<figure><img alt='{esc(caption)}' src='data:image/png;base64,{png}'>"
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def png(fig: Any) -> str:
    from matplotlib import pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def page(title: str, body: list[str]) -> str:
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>"
            + "\n".join(body) + MARK_IMAGES + "</body></html>")
