"""Fit the roofline of each device not at hand on published batch-1 latencies, and say how far that fit carries.

Reads benchmarks/reference_latency.toml (every figure with its public source and the verbatim line it came from),
builds each referenced model in torch (benchmarks/reference_models.py, random weights), prices it with the roofline
of the profile at the published precision (`deploy.targets.latency.published`), fits one efficiency per profile and
reports leave-one-model-out errors. A profile with fewer than 6 points or 3 architecture families gets no fit: it
keeps x/÷ 3 and its "not yet verified against hardware" label.

    .venv/bin/python benchmarks/reference_fit.py [--write-profiles]
writes benchmarks/results/reference_fit.{json,md}; --write-profiles stores the [published_fit] table in every
profile that passes the rule (and removes a stale one from every profile that does not); then run
benchmarks/render.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
import tomllib
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DATA = HERE / "reference_latency.toml"
PROFILES = HERE.parent / "profiles"
COMMAND = ".venv/bin/python benchmarks/reference_fit.py"
SOURCE = "benchmarks/reference_latency.toml"
REQUIRED = ("device", "model", "precision", "batch", "input_shape", "latency_ms", "runtime", "source", "quote")
NODE_CACHE = "reference_nodes"


def load_points(path: Path = DATA) -> list[dict]:
    """The [[point]] tables, checked: every figure carries its source and quote, batch 1, a known model."""
    from reference_models import FAMILIES

    points = tomllib.loads(path.read_text())["point"]
    for i, point in enumerate(points):
        missing = [k for k in REQUIRED if k not in point or point[k] in ("", None)]
        if missing:
            raise SystemExit(f"{path.name}: point {i} lacks {', '.join(missing)}")
        if point["batch"] != 1 or point["model"] not in FAMILIES:
            raise SystemExit(f"{path.name}: point {i}: batch must be 1 and model one of {', '.join(FAMILIES)}")
    return points


def predicted_profiles() -> list:
    from deploy.profiles import builtin_profiles

    return [p for p in builtin_profiles() if p.measure == "predicted"]


def nodes_for(model: str, shape: tuple[int, ...]) -> tuple:
    """The portable executed graph of a reference model, cached per model, shape and software versions."""
    import onnxruntime
    import torch

    from deploy.targets.latency import cache as latency_cache
    from deploy.targets.latency.graph import graph_nodes
    from deploy.targets.latency.nodes import NodeRecord
    from reference_models import build

    builder = (HERE / "reference_models.py").read_text()
    key = latency_cache.short_hash([model, list(shape), onnxruntime.__version__, torch.__version__, builder])
    cached = latency_cache.read_json(NODE_CACHE, f"{model}-{key}")
    if cached is not None:
        return tuple(NodeRecord.from_dict(n) for n in cached["nodes"])
    module, specs = build(model, shape)
    with torch.no_grad():
        nodes = graph_nodes(module, specs, level="extended")
    latency_cache.write_json(NODE_CACHE, f"{model}-{key}", {"nodes": [n.to_dict() for n in nodes]})
    return nodes


def price(points: list[dict], profiles: dict, say) -> list:
    """A PricedPoint per published figure whose device is a predicted profile."""
    from deploy.targets.latency.published import PricedPoint, roofline_terms
    from reference_models import FAMILIES

    priced, graphs = [], {}
    for point in points:
        profile = profiles[point["device"]]
        graph_key = (point["model"], tuple(point["input_shape"]))
        if graph_key not in graphs:
            say(f"  graph of {point['model']} {list(graph_key[1])}")
            graphs[graph_key] = nodes_for(*graph_key)
        threads = max(profile.cores, 1) if profile.kind == "cpu" else 1
        bound, overhead = roofline_terms(graphs[graph_key], profile, threads, point["precision"])
        priced.append(PricedPoint(point["model"], FAMILIES[point["model"]], bound, overhead,
                                  float(point["latency_ms"])))
    return priced


def fit_device(name: str, rows: list[tuple[dict, object]]) -> dict:
    """Fit, leave-one-model-out errors and the stored fit (or why none) for one profile."""
    from deploy.targets.latency.model import DEFAULT_EFFICIENCY
    from deploy.targets.latency.published import (BAND_QUANTILE, families, fit_efficiency, fit_published,
                                                  leave_one_model_out, median, quantile)

    pts = [p for _, p in rows]
    out: dict = {"profile": name, "points": len(pts), "architectures": families(pts) if pts else 0, "rows": []}
    if not pts:
        return {**out, "fit": None, "why": "no published batch-1 latency found"}
    eff = fit_efficiency(pts)
    lomo = leave_one_model_out(pts)
    for (point, p), err in zip(rows, lomo):
        out["rows"].append({"model": p.model, "family": p.family, "precision": point["precision"],
                            "input_shape": point["input_shape"], "published_ms": p.published_ms,
                            "predicted_ms": p.predict(eff), "default_ms": p.predict(DEFAULT_EFFICIENCY),
                            "lomo_log_error": None if math.isnan(err) else err, "source": point["source"],
                            "runtime": point["runtime"]})
    errs = [abs(e) for e in lomo if not math.isnan(e)]
    default = [abs(p.log_error(DEFAULT_EFFICIENCY)) for p in pts]
    fit = fit_published(pts, SOURCE)
    out.update({"efficiency": eff,
                "lomo_median_abs_pct": 100 * (math.exp(median(errs)) - 1) if errs else None,
                "lomo_q90_abs_log": quantile(errs, BAND_QUANTILE) if errs else None,
                "default_median_abs_pct": 100 * (math.exp(median(default)) - 1),
                "fit": None if fit is None else dataclasses.asdict(fit),
                "why": None if fit is not None else
                f"{len(pts)} points from {families(pts)} architecture(s): the rule wants >= 6 from >= 3"})
    return out


def run(say=print) -> dict:
    sys.path.insert(0, str(HERE))
    points = load_points()
    profiles = {p.name: p for p in predicted_profiles()}
    unknown = sorted({p["device"] for p in points} - set(profiles))
    if unknown:
        raise SystemExit(f"{DATA.name}: devices {unknown} are not predicted profiles")
    say(f"pricing {len(points)} published latencies on {len(profiles)} predicted profiles")
    priced = price(points, profiles, say)
    devices = [fit_device(name, [(pt, pp) for pt, pp in zip(points, priced) if pt["device"] == name])
               for name in sorted(profiles)]
    return {"command": COMMAND, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "data": SOURCE, "devices": devices}


def _pct(log_err: float | None) -> str:
    return "–" if log_err is None else f"{100 * (math.exp(log_err) - 1):+.0f}%"


def _site(url: str) -> str:
    match = re.match(r"https://github\.com/([^/]+/[^/]+)/", url)
    return match.group(1) if match else re.sub(r"^https?://([^/]+)/.*$", r"\1", url)


def markdown(result: dict) -> str:
    lines = ["## Published latencies: devices not at hand", "",
             f"`{result['command']}` ({result['date']}), figures from `{result['data']}`: batch-1 latencies others "
             "published for the predicted profiles, each with its public source and the verbatim line it came from. "
             "Each model is built in torch (random weights) and priced by the profile's roofline at the published "
             "precision; one efficiency (share of peak) per profile is fitted so the median log error is zero. "
             "Leave-one-model-out (LOMO): every model's points are predicted by a fit made without them; the band "
             "stored in the profile is the 90% quantile of |ln(predicted / published)|. **Rule:** a profile needs at "
             "least 6 points from at least 3 architecture families, else it keeps x/÷ 3 and its \"not yet verified "
             "against hardware\" label.", "",
             "| profile | points | families | fitted efficiency | LOMO median \\|error\\| | band (90% LOMO) | "
             "median \\|error\\| at the default 50% | fit stored |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for d in result["devices"]:
        if not d["points"]:
            lines.append(f"| {d['profile']} | 0 | 0 | – | – | x/÷ 3 (default) | – | no: {d['why']} |")
            continue
        band = f"x/÷ {math.exp(d['lomo_q90_abs_log']):.2f}" if d["lomo_q90_abs_log"] is not None else "–"
        stored = "yes" if d["fit"] else f"no: {d['why']}"
        median_pct = "–" if d["lomo_median_abs_pct"] is None else f"{d['lomo_median_abs_pct']:.0f}%"
        lines.append(f"| {d['profile']} | {d['points']} | {d['architectures']} | {d['efficiency']:.1%} | "
                     f"{median_pct} | {band} | {d['default_median_abs_pct']:.0f}% | {stored} |")
    for d in result["devices"]:
        if not d["rows"]:
            continue
        ceiling = (" — at the 100%-of-peak ceiling: the profile's per-op overhead alone already exceeds several "
                   "published latencies (TensorRT fuses more than the portable graph priced here)"
                   if d["efficiency"] >= 0.999 else "")
        lines += ["", f"**{d['profile']}** (fitted efficiency {d['efficiency']:.1%}{ceiling})", "",
                  "| model | family | precision | input | published ms | fitted ms | LOMO error | at 50% | source |",
                  "|---|---|---|---|---:|---:|---:|---:|---|"]
        for r in d["rows"]:
            shape = "x".join(str(s) for s in r["input_shape"][1:])
            lines.append(f"| {r['model']} | {r['family']} | {r['precision']} | {shape} | {r['published_ms']:.3g} | "
                         f"{r['predicted_ms']:.3g} | {_pct(r['lomo_log_error'])} | {r['default_ms']:.3g} | "
                         f"[{_site(r['source'])}]({r['source']}) |")
    return "\n".join(lines) + "\n"


def fit_table(fit: dict) -> str:
    return ("[published_fit]  # written by benchmarks/reference_fit.py --write-profiles; do not edit by hand\n"
            f"efficiency = {fit['efficiency']}  # fitted share of peak\n"
            f"band = {fit['band']}  # ln of the 90% leave-one-model-out |error| ratio\n"
            f"points = {fit['points']}\narchitectures = {fit['architectures']}\nsource = \"{fit['source']}\"\n")


def write_profile(name: str, fit: dict | None) -> bool:
    """Replace (or drop) the [published_fit] table of profiles/<name>.toml; True when the file changed."""
    path = PROFILES / f"{name}.toml"
    text = path.read_text()
    kept = re.sub(r"\n*\[published_fit\][^\[]*", "\n", text).rstrip("\n") + "\n"
    new = kept if fit is None else kept + "\n" + fit_table(fit)
    if new != text:
        path.write_text(new)
    return new != text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write-profiles", action="store_true", help="store the fits in the profiles' TOML files")
    args = parser.parse_args(argv)
    result = run()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "reference_fit.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / "reference_fit.md").write_text(markdown(result))
    for d in result["devices"]:
        summary = (f"efficiency {d['efficiency']:.1%}, LOMO 90% |err| x/÷ {math.exp(d['lomo_q90_abs_log']):.2f}"
                   if d.get("lomo_q90_abs_log") is not None else "no usable fit")
        print(f"{d['profile']}: {d['points']} points, {d['architectures']} families, {summary}; "
              f"{'fit' if d['fit'] else 'keeps x/÷ 3'}")
        if args.write_profiles and write_profile(d["profile"], d["fit"]):
            print(f"  wrote profiles/{d['profile']}.toml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
