"""The slot batch: rows at their own lengths decode exactly as they would alone (recurrent states too)."""

from __future__ import annotations

import mlx.core as mx
import pytest

from interp.graph import GraphModel
from interp.program import read_program
from interp.slots import COLUMN_STEP, SLOT_BUCKETS, SlotBatch, slot_bucket
from tests.archs import arch_config

PROMPTS = [[5, 17, 30, 41, 9], list(range(20, 47)), [3, 3, 8], list(range(60, 71))]
STEPS = 6


def alone(model: GraphModel, prompt: list[int], steps: int) -> list[int]:
    """Greedy tokens of one prompt through the ordinary cache and generation path."""
    cache = model.make_cache()
    logits = model(mx.array([prompt]), cache=cache)[:, -1]
    out = []
    for _ in range(steps):
        token = mx.argmax(logits, axis=-1)
        out.append(token.item())
        logits = model(token[:, None], cache=cache)[:, -1]
    return out


def prefill(model: GraphModel, prompt: list[int]) -> list:
    """A prompt's keys and values per KV layer (a program without recurrent state)."""
    kv, _ = prefill_all(model, prompt)
    return kv


def prefill_all(model: GraphModel, prompt: list[int]) -> tuple[list, list]:
    """A prompt's keys and values per KV layer, and its recurrent states (batches of one)."""
    cache = model.make_cache()
    model(mx.array([prompt]), cache=cache)
    return [c.state for c in cache[: model.num_layers]], cache[model.num_layers :]


def new_batch(model: GraphModel) -> SlotBatch:
    return SlotBatch(model.num_layers, [type(s) for s in model.make_cache()[model.num_layers :]])


def insert(model: GraphModel, batch: SlotBatch, slot: int, prompt: list[int]) -> None:
    kv, states = prefill_all(model, prompt)
    batch.insert(slot, kv, states, length=len(prompt))


def batched(model: GraphModel, prompts: list[list[int]], steps: int, join_late: int | None = None) -> list[list[int]]:
    """Greedy tokens of every prompt in one slot batch; the row ``join_late`` joins after two steps."""
    batch = new_batch(model)
    rows = {}
    for slot, prompt in enumerate(prompts):
        if slot != join_late:
            insert(model, batch, slot, prompt[:-1])
            rows[slot] = prompt[-1]
    out = {slot: [] for slot in range(len(prompts))}
    for step in range(steps + 2):
        if step == 2 and join_late is not None:
            insert(model, batch, join_late, prompts[join_late][:-1])
            rows[join_late] = prompts[join_late][-1]
        active = [slot in rows for slot in range(batch.slots)]
        tokens = mx.array([rows.get(slot, 0) for slot in range(batch.slots)])
        chosen = mx.argmax(batch.step(model, tokens, active), axis=-1).tolist()
        for slot in rows:
            if len(out[slot]) < steps:
                out[slot].append(chosen[slot])
            rows[slot] = chosen[slot]
    return [out[slot] for slot in range(len(prompts))]


@pytest.fixture(scope="module")
def tiny_model(tiny_program):
    return GraphModel.from_program(read_program(tiny_program))


@pytest.mark.parametrize("compiled", [True, False])
def test_rows_of_different_lengths_decode_as_alone(tiny_model, compiled):
    tiny_model.compile_decode = compiled
    try:
        want = [alone(tiny_model, p, STEPS) for p in PROMPTS]
        assert batched(tiny_model, PROMPTS, STEPS) == want
        assert batched(tiny_model, PROMPTS, STEPS, join_late=1) == want
    finally:
        tiny_model.compile_decode = True


@pytest.fixture(scope="module")
def arch_models(tmp_path_factory):
    """Tiny exports of families whose attention is not plain: built on first use."""
    from exporter.export import export_model
    from tests.tiny import tiny_model as build

    root, built = tmp_path_factory.mktemp("slots"), {}

    def get(arch: str) -> GraphModel:
        if arch not in built:
            out = export_model(build(arch_config(arch)), None, root / arch, source_info={"id": f"tiny-{arch}"})
            built[arch] = GraphModel.from_program(read_program(out))
        return built[arch]

    return get


# sliding windows shorter than the prompts (masks must slide per row), soft-capping, ALiBi, chunks of 4, an
# indexer keeping 4 keys of prompts up to 27 long (its keys in a KV slot, its choice per row)
@pytest.mark.parametrize("arch", ["mistral", "gemma2", "bloom", "llama4_text", "deepseek_v32"])
def test_special_attention_works_per_row(arch_models, arch):
    model = arch_models(arch)
    want = [alone(model, p, STEPS) for p in PROMPTS]
    assert batched(model, PROMPTS, STEPS, join_late=2) == want


# conv states (LFM2), conv and delta states (Qwen3.5), conv and SSM states and no attention (Mamba2), conv and
# LRU states beside windowed attention (RecurrentGemma)
@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("arch", ["lfm2", "qwen3_5_text", "mamba2", "recurrent_gemma"])
def test_recurrent_states_decode_per_row_as_alone(arch_models, arch, compiled):
    """Each row's states sit in its own row of the batched states: a free row's throwaway token,
    a row joining late and rows moving down do not touch the others'."""
    model = arch_models(arch)
    model.compile_decode = compiled
    try:
        want = [alone(model, p, STEPS) for p in PROMPTS]
        assert batched(model, PROMPTS, STEPS, join_late=1) == want
        batch = new_batch(model)
        insert(model, batch, 0, PROMPTS[0][:-1])
        insert(model, batch, 5, PROMPTS[3][:-1])
        batch.release(0)
        batch.move(5, 0)
        assert batch.fit(1) and batch.slots == 1
        tokens, out = mx.array([PROMPTS[3][-1]]), []
        for _ in range(STEPS):
            tokens = mx.argmax(batch.step(model, tokens, [True]), axis=-1)
            out.append(tokens.item())
        assert out == want[3]
        assert batch.fit(0) and batch.nbytes == 0 and batch.states.arrays() == []
    finally:
        model.compile_decode = True


def test_rows_move_and_the_batch_shrinks(tiny_model):
    batch = SlotBatch(tiny_model.num_layers)
    kv = prefill(tiny_model, PROMPTS[1])
    for slot in range(5):
        batch.insert(slot, kv)
    assert batch.slots == slot_bucket(5) == 8 and batch.capacity == COLUMN_STEP
    for slot in range(4):
        batch.release(slot)
    batch.move(4, 0)
    assert batch.fit(1) and batch.slots == 1 and batch.lengths == [len(PROMPTS[1])]
    copy = batch.extract(0)
    for (k, v), (k2, v2) in zip(copy, kv, strict=True):
        assert mx.array_equal(k, k2) and mx.array_equal(v, v2)
    assert batch.fit(0) and batch.slots == 0 and batch.nbytes == 0


def test_buckets_cover_every_row_count():
    assert [slot_bucket(n) for n in (1, 3, 9, 64, 65, 130)] == [1, 4, 12, 64, 128, 192]
    assert all(slot_bucket(b) == b for b in SLOT_BUCKETS)


def test_an_extracted_row_keeps_only_its_own_memory(tiny_model):
    import gc

    def active() -> int:
        gc.collect()
        mx.clear_cache()
        return mx.get_active_memory()

    kv = prefill(tiny_model, PROMPTS[1])
    kept, growth = [], []
    for _ in range(2):  # the first round also pays for compiling the step's shape
        kept.clear()
        before = active()
        batch = SlotBatch(tiny_model.num_layers)
        for slot in range(6):
            batch.insert(slot, kv)
        tokens = mx.array([5] * batch.slots)
        for _ in range(2):
            tokens = mx.argmax(batch.step(tiny_model, tokens, [True] * batch.slots), axis=-1)
        whole = batch.nbytes
        kept.append(batch.extract(2))
        del batch, tokens
        growth.append(active() - before)
    assert growth[1] < whole // 4  # the copy, not the whole buffer it was copied from
