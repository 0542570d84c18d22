"""Low rank is a knob of the plan: a wide Linear whose weight is rank 16 plus 1% noise costs almost nothing to
factorize, while pruning its neurons to the same latency loses what they carry; the planner, pricing both by
measured latency under the same budget, chooses low rank for it, and the plan replays as a `lowrank` pass."""
from __future__ import annotations

import torch
from torch import nn

from deploy.compiler.budget import Budget
from deploy.compiler.job import CompressRequest, Setup
from deploy.compiler.plan import meet_latency
from deploy.compiler.candidates import Planner
from deploy.core.data import from_tensors
from deploy.core.model.load import from_module
from deploy.core.spec import InputSpec
from deploy.targets.target import resolve

WIDTH, TOKENS, RANK = 1024, 64, 16


def _low_rank_model() -> nn.Module:
    torch.manual_seed(0)
    wide = nn.Linear(WIDTH, WIDTH)
    with torch.no_grad():
        weight = torch.randn(WIDTH, RANK) @ torch.randn(RANK, WIDTH) / RANK ** 0.5
        wide.weight.copy_(weight + 0.01 * weight.std() * torch.randn(WIDTH, WIDTH))
    return nn.Sequential(wide, nn.ReLU(), nn.Linear(WIDTH, 32)).eval()


def _setup(tmp_path) -> tuple[CompressRequest, Setup]:
    model = _low_rank_model()
    spec = InputSpec("x", ("batch", TOKENS, WIDTH))
    gen = torch.Generator().manual_seed(1)
    calibration = from_tensors([(torch.randn(1, TOKENS, WIDTH, generator=gen),) for _ in range(48)])
    loaded = from_module(model, [spec])
    request = CompressRequest(precisions=("fp32",), lowrank=True, budget=Budget("speedup", 2.0), measure_seconds=0.3,
                              recover_steps=0, out=str(tmp_path / "out"))
    setup = Setup(loaded, calibration, resolve("cpu", threads=1), tmp_path / "work",
                  [InputSpec("x", (1, TOKENS, WIDTH))])
    setup.workdir.mkdir()
    with torch.no_grad():
        setup.reference = [model(*b) for b in calibration.batches("held_out", 32)]
    return request, setup


def test_planner_chooses_low_rank_for_a_low_rank_layer(tmp_path):
    request, setup = _setup(tmp_path)
    planner = Planner(request, setup)
    planner.time_against_dense()
    dense = planner.evaluate(0.0, None, "dense fp32")
    choice = meet_latency(planner, dense.latency_ms / 2.0, dense)
    assert choice.ranks and "0" in choice.ranks  # the wide layer is factorized
    lowrank = [c for c in planner.candidates if c.ranks]
    pruned = [c for c in planner.candidates if c.removed]
    assert lowrank and pruned  # both families were measured at this budget
    fitting = [c for c in pruned if c.latency_ms <= 0.95 * dense.latency_ms / 2.0]
    for cand in fitting:
        planner.with_fidelity(cand)
    assert choice.fidelity > max((c.fidelity for c in fitting), default=0.0)
    assert choice.fidelity > 0.99  # rank 16 + 1% noise: factorizing loses next to nothing


def test_the_chosen_ranks_apply_as_a_lowrank_pass(tmp_path):
    """The decisions become pass configs; the lowrank pass rebuilds exactly the candidate the planner measured."""
    from deploy.compiler.candidate import decisions_for
    from deploy.compiler.to_passes import plan_passes
    from deploy.core.passes import Context, State, run_pipeline

    request, setup = _setup(tmp_path)
    planner = Planner(request, setup)
    planner.time_against_dense()
    dense = planner.evaluate(0.0, None, "dense fp32")
    planner.dense = dense
    choice = meet_latency(planner, dense.latency_ms / 2.0, dense)
    passes = plan_passes(decisions_for(planner, choice, {"target_ms": dense.latency_ms / 2.0}), request, setup)
    assert [p.name for p in passes] == ["lowrank", "export"] and passes[0].config.ranks == choice.ranks
    state = State(setup.loaded.module, setup.loaded.inputs, setup.target, original=setup.loaded.module)
    (tmp_path / "out").mkdir()
    state = run_pipeline(passes, state, Context(calibration=setup.calibration, out_dir=tmp_path / "out"))
    x = torch.randn(2, TOKENS, WIDTH)
    with torch.no_grad():
        torch.testing.assert_close(state.module(x), planner.lowrank_family().build(choice.ranks)(x))
    assert (tmp_path / "out" / "model.onnx").exists()
