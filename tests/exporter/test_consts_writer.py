"""The streaming consts writer writes ``safetensors.torch.save_file``'s bytes, one tensor at a time."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from exporter import lazy
from exporter.consts_writer import ST_DTYPES, parse_size, shard_names, write_safetensors
from exporter.lazy import LazyTensor, derive, lazy_cat
from interp.errors import ExportError


def _random(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    return torch.randint(0, 100, shape, generator=gen).to(dtype)


def test_bytes_equal_save_files_for_every_dtype(tmp_path):
    tensors = {}
    for seed, dtype in enumerate(ST_DTYPES):
        for shape in [(3, 5), (), (0, 4), (7,)]:
            tensors[f"t{seed}.{len(shape)}.{shape and shape[0]}"] = _random(dtype, shape, seed)
    tensors["z.a.view"] = torch.arange(12.0).reshape(3, 4).t()  # not contiguous
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "reference.safetensors",
              metadata={"format": "pt"})
    as_lazy = {k: LazyTensor(v.shape, v.dtype, v.clone) if i % 2 else v for i, (k, v) in enumerate(tensors.items())}
    write_safetensors(tmp_path / "streamed.safetensors", as_lazy, {"format": "pt"})
    assert (tmp_path / "streamed.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()


def test_a_lazy_tensor_that_breaks_its_promise_is_refused(tmp_path):
    liar = LazyTensor([2, 2], torch.float32, lambda: torch.zeros(2, 3))
    with pytest.raises(ExportError, match="promised"):
        write_safetensors(tmp_path / "x.safetensors", {"w": liar})


def test_derived_outputs_are_computed_once_and_recomputed_after_eviction(monkeypatch):
    calls = []

    def compute(a):
        calls.append(1)
        return a + 1, a * 2

    source = torch.ones(4)
    plus, times = derive([source], compute, [([4], torch.float32), ([4], torch.float32)])
    assert torch.equal(plus.materialize(), torch.full((4,), 2.0))
    assert torch.equal(times.materialize(), torch.full((4,), 2.0)) and len(calls) == 1
    monkeypatch.setattr(lazy, "CACHE_BYTES", 0)  # nothing kept: the sibling is computed again
    plus.materialize()
    times.materialize()
    assert len(calls) == 3
    assert torch.equal(lazy_cat([source, plus], 0).materialize(), torch.cat([source, source + 1]))


def test_shards_follow_the_natural_order_of_names_and_the_size_limit():
    tensors = {f"layers.{i}.w": torch.zeros(250, dtype=torch.uint8) for i in (10, 2, 1)}
    assert shard_names(tensors, 0) == [["layers.1.w", "layers.2.w", "layers.10.w"]]
    assert shard_names(tensors, 500) == [["layers.1.w", "layers.2.w"], ["layers.10.w"]]
    assert shard_names(tensors, 100) == [["layers.1.w"], ["layers.2.w"], ["layers.10.w"]]
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("0") == 0
    with pytest.raises(ExportError, match="as a size"):
        parse_size("lots")


def test_pread_reads_what_safetensors_reads(tmp_path):
    from safetensors import safe_open

    from exporter.pread import TORCH_DTYPES, SafetensorsFile

    dtypes = set(TORCH_DTYPES.values()) & set(ST_DTYPES)
    tensors = {f"t{i}": _random(dtype, (3, 5), i) for i, dtype in enumerate(dtypes)}
    tensors["empty"] = torch.zeros(0, 3)
    save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    with safe_open(tmp_path / "x.safetensors", "pt") as reference, SafetensorsFile(tmp_path / "x.safetensors") as ours:
        assert sorted(ours.keys()) == sorted(reference.keys()) and ours.metadata() == reference.metadata()
        for name in reference.keys():
            got = ours.get_slice(name)
            assert got.get_shape() == reference.get_slice(name).get_shape()
            assert got.get_dtype() == reference.get_slice(name).get_dtype()
            assert torch.equal(got[...], reference.get_tensor(name)), name
