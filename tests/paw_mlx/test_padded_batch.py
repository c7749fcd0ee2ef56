"""A left-padded batch after a shared prefix (paw_mlx/programs/batch.py) gives every row the
logits it gets alone, for attention that counts positions (chunks, sliding windows, ALiBi) and
for an indexer choosing keys (DeepSeek-V3.2).

The pads sit between the prefix and a row's tokens, so a key's cache column is not its
position there; attention must place chunks, windows and ALiBi's bias on positions.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

from interp.graph import GraphModel
from interp.program import read_program
from paw_mlx.programs.batch import generate_batch, prefill_batch

PREFIX = [5, 17, 30, 41, 9, 77]  # crosses a chunk boundary (chunks of 4)
ROWS = [[3, 8], [60, 61, 62, 63, 64, 65, 66], [100, 120, 140, 160]]  # 5, 0 and 3 pads
FED = [7, 100, 42, 250, 11, 19, 33, 5, 90]  # tokens every row is fed after its input


def _program(arch_program, arch: str) -> SimpleNamespace:
    """What batch.py needs of a loaded program, around the tiny export of ``arch``."""
    model = GraphModel.from_program(read_program(arch_program(arch)))
    return SimpleNamespace(model=model, make_cache=model.make_cache, lock=threading.Lock(), context_length=256,
                           eos_token_ids=set())


def _prefix(prog) -> list:
    cache = prog.make_cache()
    prog.model(mx.array([PREFIX]), cache=cache)
    return [c.state for c in cache]


def _logits(prog, prefix: list, rows: list[list[int]]) -> np.ndarray:
    """[rows, 1 + len(FED), vocab]: each row's logits after its input, then after each fed token,
    decoding as ``generate_batch`` does (the key mask grows, positions continue per row)."""
    state = prefill_batch(prog, prefix, rows)
    key_mask, out = state.key_mask, [state.logits]
    for step, token in enumerate(FED):
        positions = None
        if key_mask is not None:
            key_mask = mx.concatenate([key_mask, mx.ones((len(rows), 1), dtype=mx.bool_)], axis=1)
            positions = (state.next_positions + step)[:, None]
        tokens = mx.full((len(rows), 1), token, dtype=mx.int32)
        out.append(prog.model(tokens, cache=state.cache, positions=positions, key_mask=key_mask)[:, -1, :])
    return np.array(mx.stack(out, axis=1))


# chunked attention (llama4_text), a sliding window of 5 (mistral), ALiBi (bloom), plain (llama), an indexer
# keeping 4 keys (deepseek_v32: padding must never be among them)
@pytest.mark.parametrize("arch", ["llama4_text", "mistral", "bloom", "llama", "deepseek_v32"])
def test_padded_rows_get_the_logits_they_get_alone(arch_program, arch):
    prog = _program(arch_program, arch)
    prefix = _prefix(prog)
    together = _logits(prog, prefix, ROWS)
    for i, row in enumerate(ROWS):
        alone = _logits(prog, prefix, [row])[0]  # unpadded: columns are positions
        np.testing.assert_allclose(together[i], alone, rtol=1e-4, atol=1e-4, err_msg=f"{arch} row {i}")


@pytest.mark.parametrize("arch", ["llama4_text"])
def test_padded_rows_generate_the_tokens_they_generate_alone(arch_program, arch):
    prog = _program(arch_program, arch)
    prefix = _prefix(prog)
    together = generate_batch(prog, prefix, ROWS, max_new_tokens=12)
    assert together == [generate_batch(prog, prefix, [row], max_new_tokens=12)[0] for row in ROWS]
