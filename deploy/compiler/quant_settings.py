"""The quantization settings `deploy compress` uses, for the plan applied and for the plan search's calibrations."""
from __future__ import annotations

import dataclasses
from typing import Any

TIMING_BATCHES = 2  # calibration batches (of 16 samples) of a pruned level the search only times (`timing`)
TIMING_BIAS_SAMPLES = 16


def quant_config(request: Any, setup: Any, search: bool = False, timing: bool = False) -> Any:
    """The fast preset, the request's weight bits, the run's threads. int8 weights are per-channel only where the
    target has per-channel kernels: per-tensor runs no faster there and is less faithful, and each option costs a
    sensitivity pass per layer.

    The plan search's calibrations (`search`) round weights to nearest; GPTQ runs once, in the quantize pass of the
    plan applied: latency does not depend on the rounding, and it moves fidelity less than the structures compared
    differ (all-MiniLM-L6-v2's int8 plan: pooled cosine +0.001). At 0.5x NNCF int8's latency the search then took
    738 s instead of 1634 s on the distorted-digits CNN, 1226 s instead of 1601 s on all-MiniLM-L6-v2.

    `timing`: a pruned level the search times, in a plan that will be recovered. Its ranges come from 32 samples by
    min-max and its bias correction from 16, and SmoothQuant smooths every tensor it may at one alpha instead of
    choosing per tensor (`search_smoothing`, two thirds of a level's calibration): the graph is what is timed, and it
    is the same but for a SmoothQuant Mul where the full calibration may leave a tensor alone (all-MiniLM-L6-v2's
    all-int8 graph with a Mul on every smoothable tensor timed 1.005x the searched one's, 95% CI 0.99-1.02, so
    what is timed is not faster than what is applied), while how faithful the level is gets judged after its trial
    recovery, calibrated afresh. all-MiniLM-L6-v2's calibration then takes 3-4 s (9 s choosing the alphas, 19-28 s
    fully; 2 threads), and its level searches calibrate at each step."""
    from deploy.compress.quant.api import QuantizeConfig

    bits = tuple(b for b, p in ((8, "int8"), (4, "int4")) if p in request.precisions) or (8,)
    fast = QuantizeConfig.fast()
    grans = fast.space.granularities
    if "per-channel" in setup.target.profile.weight_granularities:
        grans = tuple(g for g in grans if g != "per-tensor")
    floats = ("fp32",) + tuple(p for p in ("fp16", "bf16") if p in request.precisions)
    calibration = dataclasses.replace(fast.calibration, gptq=fast.calibration.gptq and not (search or timing))
    if timing:
        calibration = dataclasses.replace(calibration, batches=TIMING_BATCHES, methods=("minmax",),
                                          bias_samples=TIMING_BIAS_SAMPLES, smooth_alphas=())
    return QuantizeConfig.fast(space=dataclasses.replace(fast.space, weight_bits=bits, granularities=grans,
                                                        float_precisions=floats), calibration=calibration)
