"""Pruned widths against the kernel's channel block: which widths run faster than the unpruned model, on OpenVINO.

A pruned FFN or attention width, or a convolution's pruned output, becomes the reduction axis of the next MatMul or
convolution. oneDNN's AMX kernels take 64 int8 (32 bf16) channels per tile row; a width between two multiples runs
a tail. Each row is a small model with one width pruned (six MiniLM-sized transformer blocks, or a residual
stage's 3x3 convolutions at the digits ResNet's widths), NNCF int8 (or left in float, run in bf16), timed
interleaved against the same model at the unpruned width: the ratio of medians with its 95% CI, beside the ratio
of MACs. The profile's `prune_multiple` comes from this (`cpu-amx-openvino`: 64).

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
PRUNED = {  # what is pruned: the unpruned width first, then widths that are multiples of 16, 32 and 64
    "FFN": (1536, 1520, 1504, 1472, 1408, 1280),
    "attention": (384, 352, 320, 256),  # 11, 10 and 8 of 12 heads of 32
    "conv 16x16": (128, 112, 96, 64),  # the digits ResNet's second stage
    "conv 8x8": (256, 240, 224, 192),  # and its third
}


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


class Convs(torch.nn.Module):
    """A residual stage's inner convolutions: 3x3 convs whose middle width is pruned (a BasicBlock's conv1 output,
    conv2's reduction axis), between unpruned stage widths."""

    def __init__(self, stage: int, width: int):
        super().__init__()
        self.narrow = torch.nn.ModuleList(torch.nn.Conv2d(stage, width, 3, padding=1) for _ in range(4))
        self.wide = torch.nn.ModuleList(torch.nn.Conv2d(width, stage, 3, padding=1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for narrow, wide in zip(self.narrow, self.wide):
            x = torch.relu(x + wide(torch.relu(narrow(x))))
        return x


def input_shape(pruned: str) -> tuple[int, ...]:
    if pruned.startswith("conv"):
        side = int(pruned.split()[1].split("x")[0])
        return (1, PRUNED[pruned][0], side, side)
    return (1, SEQ, HIDDEN)


def stack(pruned: str, width: int) -> torch.nn.Module:
    """The model with `pruned` at `width`."""
    if pruned.startswith("conv"):
        return Convs(PRUNED[pruned][0], width)
    return Blocks(width, ATTENTION) if pruned == "FFN" else Blocks(FFN, width)


def macs(pruned: str, width: int) -> float:
    """What the model with `pruned` at `width` computes, counted without building it."""
    if pruned.startswith("conv"):
        _, stage, side, _ = input_shape(pruned)
        return float(4 * 2 * 9 * stage * width * side * side)
    ffn, attention = (width, ATTENTION) if pruned == "FFN" else (FFN, width)
    return float(BLOCKS * SEQ * HIDDEN * (2 * attention + 2 * ffn))


def ir(pruned: str, width: int, int8: bool, folder: Path) -> Path:
    """The model as an OpenVINO IR: NNCF int8 (8 calibration samples: the ranges do not change the timing) or
    float."""
    import nncf
    import openvino as ov

    torch.manual_seed(0)
    shape = input_shape(pruned)
    model = ov.convert_model(stack(pruned, width).eval(), example_input=torch.randn(shape))
    if int8:
        model = nncf.quantize(model, nncf.Dataset([torch.randn(shape).numpy() for _ in range(8)]), subset_size=8)
    path = folder / f"{'int8' if int8 else 'float'}-{pruned.replace(' ', '')}-{width}.xml"
    ov.save_model(model, str(path))
    return path


def run(quick: bool, threads: int) -> dict[str, Any]:
    from deploy.core.spec import InputSpec
    from deploy.profiles import local_cpu_flags, resolve_target
    from deploy.targets.measure.fingerprint import fingerprint

    seconds = 1.0 if quick else 3.0
    rows = []
    with tempfile.TemporaryDirectory(prefix="deploy-widths-") as tmp:
        for int8 in (True, False):
            for pruned, widths in PRUNED.items():
                base = ir(pruned, widths[0], int8, Path(tmp))
                case = {"inputs": [InputSpec("x", input_shape(pruned), "float32")]}
                for width in widths[1:]:
                    timed = head_to_head(base, ir(pruned, width, int8, Path(tmp)), case, threads, seconds, "bf16")
                    rows.append({"precision": "int8" if int8 else "bf16", "pruned": pruned, "width": width,
                                 "multiple_of": max(m for m in (16, 32, 64) if width % m == 0),
                                 "macs_ratio": macs(pruned, width) / macs(pruned, widths[0]), **timed})
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
              f"Transformer rows: six blocks at hidden {HIDDEN}, seq {SEQ}, unpruned FFN {FFN}, attention {ATTENTION}; "
              "convolution rows: four pairs of 3x3 convolutions, the first of each pair pruned.", "",
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
