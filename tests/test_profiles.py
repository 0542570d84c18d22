"""Device profiles: the thirteen built-ins, strict validation, aliases and suggestions."""
from __future__ import annotations

import pytest

from deploy.core.errors import ProfileError, UnknownTargetError
from deploy.profiles import builtin_names, builtin_profiles, load_profile_file, resolve_target

BUILTINS = {"cpu-avx2", "cpu-avx2-openvino", "cpu-avx-vnni", "cpu-avx-vnni-openvino", "cpu-avx512-vnni",
            "cpu-avx512-vnni-openvino", "nvidia-a100", "nvidia-h100", "jetson-orin-nano", "jetson-orin-nx",
            "jetson-agx-orin", "rpi5", "cpu-amx-openvino"}

GOOD = """
name = "my-board"
description = "a user's board"
kind = "edge"
runtime = "onnxruntime"
measure = "predicted"
precisions = ["fp32", "int8"]
weight_granularities = ["per-channel"]
qdq_policy = "ort-cpu"
channel_multiple = 8
memory_bandwidth_gbs = 25.6
op_overhead_us = 8
[peak_tops]
fp32 = 0.5
int8 = 2.0
"""


def test_the_builtin_profiles_load():
    assert set(builtin_names()) == BUILTINS
    for profile in builtin_profiles():
        assert set(profile.precisions) <= set(profile.peak_tops)
        assert profile.memory_bandwidth_gbs > 0 and profile.channel_multiple >= 1
        assert profile.width_step % profile.channel_multiple == 0  # pruning keeps whole vectors too


def test_amx_widths_are_whole_tile_rows_and_a_profile_without_them_prunes_to_its_lanes(tmp_path):
    """AMX int8 kernels take 64 channels per tile row: a pruned FFN or attention width between multiples of 64 ran
    slower than the unpruned one (benchmarks/width_steps.py), so the AMX profile's pruning options keep to 64
    while the AVX-512 one keeps to its 16 fp32 lanes; `prune_multiple` is checked like `channel_multiple`."""
    from deploy.compress.prune.units import UnitConfig, legal_removals

    amx, avx512 = resolve_target("cpu-amx-openvino").profile, resolve_target("cpu-avx512-vnni-openvino").profile
    assert (amx.width_step, avx512.width_step) == (64, 16) and amx.channel_multiple == avx512.channel_multiple
    grid = UnitConfig().grid
    kept = {1536 - n for n in legal_removals(1536, 1, amx.width_step, grid)}
    assert 1536 in kept and len(kept) >= 10 and all(k % 64 == 0 for k in kept), sorted(kept)
    assert any(k % 64 for k in (1536 - n for n in legal_removals(1536, 1, avx512.width_step, grid)))
    heads = legal_removals(12, 32, amx.width_step, grid)  # 32-wide heads: an even number kept
    assert heads and all((12 - n) % 2 == 0 for n in heads) and 1 not in heads
    assert (amx.to_dict()["prune_multiple"], avx512.to_dict()["prune_multiple"]) == (64, 16)  # as `profiles show`
    bad = tmp_path / "bad.toml"
    bad.write_text(GOOD.replace("[peak_tops]", "prune_multiple = 0\n[peak_tops]"))
    with pytest.raises(ProfileError, match="prune_multiple"):
        load_profile_file(bad)


def test_design_numbers():
    nano = resolve_target("jetson-orin-nano").profile
    assert nano.peak_tops["int8"] == 20.0 and nano.memory_bandwidth_gbs == 68.0 and "fp8" not in nano.precisions
    assert resolve_target("nvidia-h100").profile.peak_tops["fp8"] == 1979.0
    assert resolve_target("jetson-agx-orin").profile.memory_bandwidth_gbs == 204.8


def test_aliases_say_what_they_resolved_to():
    jetson = resolve_target("jetson")
    assert jetson.profile.name == "jetson-orin-nano" and "jetson-orin-nano" in jetson.note
    cpu = resolve_target("cpu")
    assert cpu.profile.name in ("cpu-avx512-vnni", "cpu-avx2") and "resolved" in cpu.note
    assert cpu.profile.runs_locally()


def test_unknown_target_suggests_the_nearest():
    with pytest.raises(UnknownTargetError) as info:
        resolve_target("jetson-orin-nan")
    assert "did you mean 'jetson-orin-nano'" in info.value.one_line()
    assert info.value.exit_code == 2


def test_user_profile_file(tmp_path):
    path = tmp_path / "board.toml"
    path.write_text(GOOD)
    resolved = resolve_target(profile_path=path)
    assert resolved.profile.name == "my-board" and resolved.profile.op_overhead_us == 8.0


@pytest.mark.parametrize("edit, message", [
    (("channel_multiple = 8", 'channel_multiple = "eight"'), "field 'channel_multiple' must be a positive integer"),
    (("runtime = \"onnxruntime\"", "runtime = \"tflite\""), "field 'runtime' must be one of"),
    (("precisions = [\"fp32\", \"int8\"]", "precisions = [\"fp32\", \"int3\"]"), "field 'precisions'"),
    (("op_overhead_us = 8", "op_overhead_us = 8\nchanel_multiple = 4"), "unknown field 'chanel_multiple'"),
    (("memory_bandwidth_gbs = 25.6\n", ""), "missing field 'memory_bandwidth_gbs'"),
    (("int8 = 2.0", "int8 = -1"), "peak_tops.int8"),
    (("int8 = 2.0", ""), "no entry for precision 'int8'"),
    (("op_overhead_us = 8", "op_overhead_us = 8\nint8_weight_bits = 6"), "field 'int8_weight_bits' must be 7 or 8"),
])
def test_invalid_profile_names_file_field_and_type(tmp_path, edit, message):
    path = tmp_path / "bad.toml"
    path.write_text(GOOD.replace(*edit))
    with pytest.raises(ProfileError) as info:
        load_profile_file(path)
    assert message in info.value.one_line()
    assert str(path) in info.value.one_line()


def test_profile_that_is_not_toml(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("name = [unclosed")
    with pytest.raises(ProfileError, match="not valid TOML"):
        load_profile_file(path)


def test_cpu_openvino_alias_follows_the_cpu_flags():
    from deploy.profiles import local_cpu_flags

    flags = local_cpu_flags()
    if {"avx2", "fma"} <= flags:
        resolved = resolve_target("cpu-openvino")
        assert resolved.profile.runtime == "openvino" and resolved.profile.qdq_policy == "openvino"
        vnni = ("amx" if {"avx512f", "avx512_vnni", "amx_tile", "amx_int8", "amx_bf16"} <= flags
                else "avx512-vnni" if {"avx512f", "avx512_vnni"} <= flags else "avx-vnni" if "avx_vnni" in flags
                else "avx2")
        assert resolved.profile.name == f"cpu-{vnni}-openvino"
        assert resolved.profile.name in resolved.note
    else:
        with pytest.raises(UnknownTargetError, match="avx2"):
            resolve_target("cpu-openvino")


def test_cpu_openvino_takes_the_first_profile_whose_flags_this_cpu_has(monkeypatch):
    """An AVX2 CPU without VNNI (AMD Zen 2/3) gets the AVX2 profiles, whose int8 weights keep 7 bits against
    vpmaddubsw's 16-bit saturation; one with AVX-VNNI (Alder Lake) the AVX-VNNI ones, with 8-bit weights; a CPU
    without AVX2 is refused naming what it lacks."""
    import deploy.profiles.schema as schema

    avx2 = {"avx2", "fma"}
    for flags, expected, bits in ((avx2, "cpu-avx2", 7), (avx2 | {"avx_vnni"}, "cpu-avx-vnni", 8),
                                  (avx2 | {"avx_vnni", "avx512f", "avx512_vnni"}, "cpu-avx512-vnni", 8)):
        monkeypatch.setattr(schema, "local_cpu_flags", lambda flags=flags: set(flags))
        for alias, suffix in (("cpu", ""), ("cpu-openvino", "-openvino")):
            profile = resolve_target(alias).profile
            assert (profile.name, profile.int8_weight_bits) == (expected + suffix, bits)
    amx = avx2 | {"avx_vnni", "avx512f", "avx512_vnni", "amx_tile", "amx_int8", "amx_bf16"}  # Sapphire Rapids
    monkeypatch.setattr(schema, "local_cpu_flags", lambda: set(amx))
    assert (resolve_target("cpu-openvino").profile.name, resolve_target("cpu").profile.name) == \
        ("cpu-amx-openvino", "cpu-avx512-vnni")
    monkeypatch.setattr(schema, "local_cpu_flags", lambda: {"sse4_2"})
    with pytest.raises(UnknownTargetError, match="this CPU lacks avx2, fma"):
        resolve_target("cpu-openvino")
