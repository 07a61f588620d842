"""The allocation type: exact counts, round trip through safetensors, refusal of bad files and wrong models."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from consa_cli.allocation import Allocation, AllocationError, full_unit_count, write_atomically
from consa_cli.baselines import RULES, rule_allocation


def make(granularity="kv-head", mask=None):
    mask = torch.tensor([[True, False], [False, False], [True, True]]) if mask is None else mask
    return Allocation(mask, granularity, sliding_window=16, sink_tokens=4, model="tiny", model_fingerprint="abc",
                      scores=torch.arange(6.0), metadata={"note": "x"})


def test_counts_and_sparsity_per_granularity():
    head = make()
    assert (head.num_units, head.num_full_units) == (6, 3)
    assert head.sparsity == pytest.approx(0.5)
    layer = make("layer", torch.tensor([[True, True], [False, False], [False, False]]))
    assert (layer.num_units, layer.num_full_units, layer.layer_is_full) == (3, 1, [True, False, False])
    with pytest.raises(AllocationError, match="same attention type"):
        make("layer")


def test_save_load_round_trip(tmp_path):
    original = make()
    original.save(tmp_path / "a.safetensors")
    loaded = Allocation.load(tmp_path / "a.safetensors")
    assert torch.equal(loaded.fa_mask, original.fa_mask)
    assert torch.equal(loaded.scores, original.scores)
    assert (loaded.granularity, loaded.sliding_window, loaded.sink_tokens, loaded.model_fingerprint) == (
        "kv-head", 16, 4, "abc")
    assert loaded.metadata == {"note": "x"}
    assert not list(tmp_path.glob(".*tmp"))  # no temp file left behind


@pytest.mark.parametrize("content", [b"", b"not a safetensors file at all", b"\x08\x00\x00\x00\x00\x00\x00\x00{}"])
def test_corrupt_files_are_refused(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(AllocationError):
        Allocation.load(path)


def test_truncated_file_is_refused(tmp_path):
    make().save(tmp_path / "a.safetensors")
    data = (tmp_path / "a.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) - 10])
    with pytest.raises(AllocationError):
        Allocation.load(tmp_path / "t.safetensors")


def test_check_fits_names_the_difference():
    allocation = make()
    allocation.check_fits(3, 2, "abc")
    with pytest.raises(AllocationError, match="3 layers x 2 KV heads, but the model has 4 layers x 2"):
        allocation.check_fits(4, 2)
    with pytest.raises(AllocationError, match="another model"):
        allocation.check_fits(3, 2, "zzz")


@pytest.mark.parametrize(("units", "sparsity", "expected"), [(90, 0.75, 22), (30, 0.75, 7), (4, 0.74, 1), (8, 0.5, 4), (8, 1.0, 0),
                                                           (8, 0.0, 8), (18, 0.8888889, 2), (18, 0.8333333, 3),
                                                           (18, 0.8889, 2), (18, 0.889, 1), (18, 0.9444444, 1)])
def test_full_unit_count(units, sparsity, expected):
    assert full_unit_count(units, sparsity) == expected


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("granularity", ["layer", "kv-head", "kv-head-per-layer"])
def test_rules_hit_the_requested_count(rule, granularity):
    if rule == "uniform-heads" and granularity == "layer":
        with pytest.raises(AllocationError):
            rule_allocation(rule, 8, 4, 0.75, granularity, 16, 0)
        return
    allocation = rule_allocation(rule, 8, 4, 0.75, granularity, 16, 0)
    assert allocation.sparsity == pytest.approx(0.75)
    assert allocation.num_full_units == (2 if granularity == "layer" else 8)
    assert allocation.method == f"rule:{rule}"


def test_interleaved_rule_spaces_full_layers_evenly():
    allocation = rule_allocation("interleaved", 30, 3, 0.75, "layer", 128, 4)
    assert [i for i, full in enumerate(allocation.layer_is_full) if full] == [3, 7, 11, 16, 20, 24, 29]


def test_written_files_get_the_umask_mode_not_owner_only(tmp_path):
    """mkstemp's temp file is 0600; the renamed result must be readable like any other new file."""
    previous = os.umask(0o022)
    try:
        write_atomically(tmp_path / "out.txt", lambda path: path.write_text("x"))
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "out.txt").stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]  # no temp file left behind
