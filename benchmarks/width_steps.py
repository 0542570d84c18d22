"""Pruned widths against the kernel's channel block: which widths run faster than the unpruned model, on OpenVINO.

A transformer's pruned FFN or attention width becomes the reduction axis of the next MatMul. oneDNN's AMX kernels
take 64 int8 (32 bf16) channels per tile row; a width between two multiples runs a tail. Each row is a stack of
six MiniLM-sized blocks (hidden 384, seq 128, batch 1: attention projections, an FFN, LayerNorm) with one width
pruned, NNCF int8 (or left in float, run in bf16), timed interleaved against the same stack at the unpruned width:
the ratio of medians with its 95% CI, beside the ratio of MACs. The profile's `prune_multiple` comes from this
(`cpu-amx-openvino`: 64).

    .venv/bin/python benchmarks/width_steps.py [--quick] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))
from quantization import head_to_head  # noqa: E402

HIDDEN, SEQ, BLOCKS, FFN, ATTENTION = 384, 128, 6, 1536, 384
FFN_WIDTHS = (1536, 1520, 1504, 1472, 1408, 1280)  # multiples of 16, 32 and 64 below the unpruned 1536
ATTENTION_WIDTHS = (384, 352, 320, 256)  # 11, 10 and 8 of 12 heads of 32


class Blocks(torch.nn.Module):
    """Six encoder-like blocks without the softmax: what pruning narrows (projections and FFN), at one width each."""

    def __init__(self, ffn: int, attention: int):
        super().__init__()
        self.q = torch.nn.ModuleList(torch.nn.Linear(HIDDEN, attention) for _ in range(BLOCKS))
        self.o = torch.nn.ModuleList(torch.nn.Linear(attention, HIDDEN) for _ in range(BLOCKS))
        self.up = torch.nn.ModuleList(torch.nn.Linear(HIDDEN, ffn) for _ in range(BLOCKS))
        self.down = torch.nn.ModuleList(torch.nn.Linear(ffn, HIDDEN) for _ in range(BLOCKS))
        self.norm = torch.nn.LayerNorm(HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for q, o, up, down in zip(self.q, self.o, self.up, self.down):
            x = self.norm(x + o(q(x)))
            x = self.norm(x + down(torch.nn.functional.gelu(up(x))))
        return x


def macs(ffn: int, attention: int) -> float:
    return float(BLOCKS * SEQ * HIDDEN * (2 * attention + 2 * ffn))


def ir(ffn: int, attention: int, int8: bool, folder: Path) -> Path:
    """The stack as an OpenVINO IR: NNCF int8 (8 calibration samples: the ranges do not change the timing) or
    float."""
    import nncf
    import openvino as ov

    torch.manual_seed(0)
    example = torch.randn(1, SEQ, HIDDEN)
    model = ov.convert_model(Blocks(ffn, attention).eval(), example_input=example)
    if int8:
        model = nncf.quantize(model, nncf.Dataset([torch.randn(1, SEQ, HIDDEN).numpy() for _ in range(8)]),
                              subset_size=8)
    path = folder / f"{'int8' if int8 else 'float'}-{ffn}-{attention}.xml"
    ov.save_model(model, str(path))
    return path


def run(quick: bool, threads: int) -> dict[str, Any]:
    from deploy.core.spec import InputSpec
    from deploy.profiles import local_cpu_flags, resolve_target
    from deploy.targets.measure.fingerprint import fingerprint

    case = {"inputs": [InputSpec("x", (1, SEQ, HIDDEN), "float32")]}
    seconds = 1.0 if quick else 3.0
    rows = []
    with tempfile.TemporaryDirectory(prefix="deploy-widths-") as tmp:
        for int8 in (True, False):
            base = ir(FFN, ATTENTION, int8, Path(tmp))
            shapes = [(w, ATTENTION, "FFN") for w in FFN_WIDTHS[1:]] + \
                     [(FFN, w, "attention") for w in ATTENTION_WIDTHS[1:]]
            for ffn, attention, pruned in shapes:
                width = ffn if pruned == "FFN" else attention
                timed = head_to_head(base, ir(ffn, attention, int8, Path(tmp)), case, threads, seconds, "bf16")
                rows.append({"precision": "int8" if int8 else "bf16", "pruned": pruned, "width": width,
                             "multiple_of": max(m for m in (16, 32, 64) if width % m == 0),
                             "macs_ratio": macs(ffn, attention) / macs(FFN, ATTENTION), **timed})
                print(f"{rows[-1]['precision']} {pruned} {width}: {timed['ratio']:.3f} "
                      f"({timed['ratio_ci'][0]:.3f}-{timed['ratio_ci'][1]:.3f})", flush=True)
    flags = local_cpu_flags()
    return {"rows": rows, "cpu": fingerprint(threads)["cpu"], "threads": threads,
            "amx": sorted(f for f in flags if f.startswith("amx")),
            "profile": resolve_target("cpu-openvino").profile.name}


def markdown(result: dict[str, Any], command: str, date: str, wall: float) -> str:
    amx = ", ".join(result["amx"]) or "none"
    lines = ["## Pruned widths and the kernel's channel block", ""]
    lines += [" ".join(part.split()) for part in __doc__.split("\n\n")[1:2]] + [""]
    lines += [f"Command: `{command}`; {date}; wall time {wall:.0f} s. Machine: {result['cpu']} (AMX flags: {amx}; "
              f"`--target cpu-openvino` resolves to `{result['profile']}`), {result['threads']} threads. "
              f"Six blocks at hidden {HIDDEN}, seq {SEQ}; unpruned FFN {FFN}, attention {ATTENTION}.", "",
              "| precision | pruned | width | largest of 16/32/64 dividing it | MACs / unpruned | "
              "p50 / unpruned (95% CI) |", "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        lo, hi = row["ratio_ci"]
        lines.append(f"| {row['precision']} | {row['pruned']} | {row['width']} | {row['multiple_of']} | "
                     f"{row['macs_ratio']:.3f} | {row['ratio']:.3f} ({lo:.3f}-{hi:.3f}) |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 s of interleaved timing per row instead of 3")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    result = run(args.quick, args.threads)
    command = "python benchmarks/width_steps.py" + (" --quick" if args.quick else "") + f" --threads {args.threads}"
    date = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "width_steps.json").write_text(json.dumps({"command": command, "date": date, **result}, indent=1))
    md = markdown(result, command, date, time.perf_counter() - started)
    (RESULTS / "width_steps.md").write_text(md)
    subprocess.run([sys.executable, str(HERE / "render.py")], check=True)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
