"""Per-layer latency tables: nodes map back to torch modules, the per-layer sum explains the end-to-end latency,
a layer made 4x heavier shows up as the heaviest, and tables are cached."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from deploy.core.spec import InputSpec
from deploy.targets.latency.layer_table import LayerTable, LayerTableConfig, layer_table
from deploy.targets.measure.loop import MeasureConfig

IMAGE = [InputSpec("image", (1, 3, 64, 64))]
QUICK = MeasureConfig.quick(min_samples=40, min_seconds=0.15)


def config(**changes) -> LayerTableConfig:
    base = dict(threads=1, runs=25, warmup_runs=3, rounds=2, measure=QUICK, use_cache=False)
    return LayerTableConfig(**{**base, **changes})


class Net(nn.Module):
    """Four convs; `kernel` of the second sets its cost (a 6x6 kernel is 4x the MACs of a 3x3, same shapes)."""

    def __init__(self, kernel: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.mid = nn.Conv2d(16, 16, kernel, 1, padding="same")
        self.act = nn.ReLU()
        self.down1 = nn.Conv2d(16, 32, 3, 1, 1)  # twice the 3x3 mid's MACs, half the 6x6 one's
        self.down2 = nn.Conv2d(32, 64, 3, 2, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down2(torch.relu(self.down1(self.act(self.mid(self.stem(x))))))
        return self.fc(self.flatten(self.pool(x)))


def _resnet() -> nn.Module:
    from deploy.targets.latency.reference import ResNetish, randomize_norms

    return randomize_norms(ResNetish((16, 32, 64), 1))


def test_nodes_map_to_modules_and_sum_matches_end_to_end(tmp_path):
    model = _resnet()
    # both sides are each node's and the end-to-end quietest round: five rounds, so that a shared machine's
    # slow spell (end-to-end rounds of 1.49, 1.20 and 1.43 ms in one CI run) leaves a quiet one on both sides
    table = layer_table(model, IMAGE, config(rounds=5))
    names = {n for n, _ in model.named_modules()}
    assert table.mapped_fraction >= 0.9
    assert all(row.module in names or row.module == "(unmapped)" for row in table.layers)
    assert abs(table.node_sum_ms / table.e2e_p50_ms - 1) <= 0.15, (table.node_sum_ms, table.e2e_p50_ms)
    assert table.heaviest()[0].module.startswith("blocks.")  # the 3x3 convs, not the stem or the head
    assert {"Conv"} <= {op for row in table.layers for op in row.op_types}


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_a_four_times_heavier_layer_is_found():
    light = layer_table(Net(kernel=3).eval(), IMAGE, config())
    heavy = layer_table(Net(kernel=6).eval(), IMAGE, config())
    assert light.heaviest()[0].module != "mid" and heavy.heaviest()[0].module == "mid"
    ratio = heavy.row("mid").ms / light.row("mid").ms
    assert 2.5 <= ratio <= 6.0, ratio  # 4x the MACs


def test_transformer_nodes_map_to_modules():
    from deploy.examples.tiny_bert import tiny_bert

    specs = [InputSpec("input_ids", (1, 16), "int64"), InputSpec("attention_mask", (1, 16), "int64")]
    table = layer_table(tiny_bert(vocab_size=500), specs, config(rounds=1, runs=10))
    assert table.mapped_fraction >= 0.9
    modules = {row.module for row in table.layers}
    assert any(m.endswith("attention.self") for m in modules)
    assert any(m.endswith("intermediate.dense") for m in modules)


def test_openvino_counters_map_and_show_precision():
    table = layer_table(Net(kernel=3).eval(), IMAGE, config(runtime="openvino", rounds=1, runs=10))
    assert table.mapped_fraction >= 0.9
    conv = next(n for n in table.nodes if n.module == "mid")
    assert conv.exec_type and conv.precision == "fp32"


def test_tables_are_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("DEPLOY_CACHE_DIR", str(tmp_path))
    model = Net(kernel=5).eval()
    first = layer_table(model, IMAGE, config(use_cache=True, rounds=1, runs=5))
    import deploy.targets.latency.layer_table as module

    def fail(*args, **kwargs):
        raise AssertionError("measured again instead of reading the cache")

    monkeypatch.setattr(module, "_measure_table", fail)
    second = layer_table(model, IMAGE, config(use_cache=True, rounds=1, runs=5))  # same weights, same hash
    assert second == first
    assert LayerTable.from_dict(first.to_dict()) == first
    assert list((tmp_path / "layer_tables").glob("*.json"))


def test_config_is_validated():
    from deploy.core.errors import UserInputError

    with pytest.raises(UserInputError):
        LayerTableConfig(runtime="tensorrt")
    with pytest.raises(UserInputError):
        LayerTableConfig(rounds=0)
