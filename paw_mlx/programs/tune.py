"""Prefix tuning: fit a program's KV prefix to input/output examples by gradient descent.

The base model stays frozen; the only parameters are the keys and values of the
prefix in the top ``layers`` attention layers. Two things keep this cheap on a CPU:

* the graph is cut just after the last frozen attention layer. Everything before the
  cut depends only on the frozen prefix and the example tokens, so it runs once per
  mini-batch; each step runs (and differentiates) only the part after the cut.
* the language-model head runs only at the positions whose next token is scored
  (the output tokens), not over every position.

The cache that holds the trainable prefix concatenates instead of writing into a
buffer (``KVCache`` uses slice assignment, which ``mx.value_and_grad`` cannot see
through). The loss is cross-entropy on the output tokens and the end-of-turn token.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np

from interp.errors import PawError
from interp.graph import GraphModel
from interp.ops import REGISTRY
from paw_mlx.programs.artifact import ProgramArtifact
from paw_mlx.programs.compile import input_ids
from paw_mlx.runtime import LoadedProgram

Progress = Callable[[int, int, float], None]


@dataclass
class TuneOptions:
    # Chosen on the six tasks of examples/tasks (held-out exact match, SmolLM2-135M):
    # top 6 layers x 12 steps 0.56, 6 x 48 0.58, 12 x 24 0.67, 12 x 36 0.79, 18 x 24 0.60,
    # all 30 x 24 0.23
    # (all layers at this rate overshoot). See docs/programs.md.
    steps: int = 36
    learning_rate: float = 3e-2
    batch_size: int = 4
    layers: int = 12  # tune the prefix of this many top layers; 0 tunes all of them
    holdout: float = 0.25  # share of examples held out (when they carry no "split" field)
    seed: int = 0


class TrainableCache:
    """A cache for training: the prefix (a differentiable array) joined to the new keys."""

    def __init__(self, keys: mx.array, values: mx.array):
        self.keys, self.values = keys, values
        self.offset = keys.shape[2]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        return mx.concatenate([self.keys, keys], axis=2), mx.concatenate([self.values, values], axis=2)


# ----------------------------------------------------------------------------- examples


def load_examples(path: str | Path) -> list[dict]:
    """Rows of a JSON-lines file, each {"input": str, "output": str[, "split": "train"|"test"]}."""
    path = Path(path)
    if not path.is_file():
        raise PawError(f"no such examples file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PawError(f"cannot read the examples file {path}: {exc}") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deeply
            raise PawError(f"{path}:{n}: not JSON: {exc}") from None
        if not isinstance(row, dict) or not isinstance(row.get("input"), str) or not isinstance(row.get("output"), str):
            raise PawError(f'{path}:{n}: each line must be {{"input": "...", "output": "..."}}')
        rows.append(row)
    if not rows:
        raise PawError(f"{path} holds no examples")
    return rows


def split_examples(rows: Sequence[dict], holdout: float = 0.25, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, held-out): by each row's "split" field if any row has one, else a seeded shuffle."""
    if any("split" in r for r in rows):
        train = [r for r in rows if r.get("split", "train") == "train"]
        held = [r for r in rows if r.get("split", "train") != "train"]
    else:
        order = list(rows)
        random.Random(seed).shuffle(order)
        cut = len(order) - int(round(len(order) * holdout))
        train, held = order[:cut], order[cut:]
    if not train:
        raise PawError("no training examples left after the held-out split")
    return train, held


# ----------------------------------------------------------------------------- graph split


def _names(value) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _names(item)


def _sub_model(model: GraphModel, nodes: list, outputs: list[str]) -> GraphModel:
    spec = dict(model.program.spec, outputs=[{"name": n} for n in outputs])
    return GraphModel(replace(model.program, spec=spec, nodes=nodes), model.consts)


class SplitModel:
    """The base graph cut in three: frozen front, trainable back, and the LM head."""

    def __init__(self, model: GraphModel, first_tuned_layer: int):
        nodes = model.program.nodes
        frozen = [i for i, n in enumerate(nodes) if n.op == "attention" and n.attrs["layer"] < first_tuned_layer]
        cut = frozen[-1] + 1 if frozen else 0
        last = nodes[-1]
        self.head = None
        back_nodes = nodes[cut:]
        back_out = model.output_names[0]
        head_args = list(last.inputs[1:])
        if (last.op == "linear" and list(last.outputs) == [back_out]
                and all(a is None or a in model.consts for a in head_args)):
            # The LM head: evaluated only at the scored positions.
            self.head = (REGISTRY["linear"].fn, [None if a is None else model.consts[a] for a in head_args])
            back_nodes, back_out = nodes[cut:-1], last.inputs[0]
        produced = set(model.input_names)
        for node in nodes[:cut]:
            produced.update(node.outputs)
        needed = []
        for node in back_nodes:
            for name in [*_names(node.inputs), *_names(list(node.attrs.values()))]:
                if name in produced and name not in needed:
                    needed.append(name)
        self.frontier = needed
        self.front = _sub_model(model, nodes[:cut], needed)
        self.back = _sub_model(model, back_nodes, [back_out])
        self.num_layers = model.num_layers

    def scores(self, hidden: mx.array) -> mx.array:
        if self.head is None:
            return hidden
        fn, args = self.head
        return fn(hidden, *args)


@dataclass
class _Batch:
    frontier: dict
    rows: np.ndarray  # flat indices into [batch * length] of scored positions
    targets: mx.array
    batch: int


def _encode(prog: LoadedProgram, artifact: ProgramArtifact, row: dict, eos: int) -> tuple[list[int], int]:
    prompt = input_ids(prog.tokenizer, artifact.layout, row["input"])
    answer = prog.tokenizer.encode(row["output"], add_special_tokens=False) + [eos]
    return prompt + answer, len(prompt)


def _end_token(prog: LoadedProgram) -> int:
    tok = prog.tokenizer
    if tok.eos_token is not None and tok.token_to_id(tok.eos_token) is not None:
        return tok.token_to_id(tok.eos_token)
    if not prog.eos_token_ids:
        raise PawError("the base model declares no end-of-sequence token to stop its outputs")
    return min(prog.eos_token_ids)


def _frozen_caches(prefix, first_tuned: int, batch: int) -> list:
    caches: list = [None] * len(prefix)
    for layer in range(first_tuned):
        k, v = prefix[layer]
        caches[layer] = TrainableCache(mx.broadcast_to(k, (batch, *k.shape[1:])),
                                       mx.broadcast_to(v, (batch, *v.shape[1:])))
    return caches


def _prepare(split: SplitModel, prog: LoadedProgram, artifact: ProgramArtifact, rows: Sequence[dict],
             first_tuned: int, batch_size: int) -> list[_Batch]:
    """Encode examples into right-padded mini-batches and run the frozen front once for each."""
    eos = _end_token(prog)
    start = artifact.prefix_length
    batches = []
    for i in range(0, len(rows), batch_size):
        group = [_encode(prog, artifact, r, eos) for r in rows[i : i + batch_size]]
        width = max(len(ids) for ids, _ in group)
        tokens = np.zeros((len(group), width), dtype=np.int32)
        flat, targets = [], []
        for b, (ids, n_prompt) in enumerate(group):
            tokens[b, : len(ids)] = ids
            for t in range(n_prompt - 1, len(ids) - 1):  # position t predicts token t + 1
                flat.append(b * width + t)
                targets.append(ids[t + 1])
        positions = np.broadcast_to(np.arange(start, start + width, dtype=np.int32), tokens.shape)
        inputs = {"input_ids": mx.array(tokens), "position_ids": mx.array(positions)}
        frontier = split.front.run(inputs, cache=_frozen_caches(artifact.prefix, first_tuned, len(group)))
        mx.eval([v for v in frontier.values() if isinstance(v, mx.array)])
        batches.append(_Batch(frontier, np.array(flat), mx.array(targets), len(group)))
    return batches


def _loss(split: SplitModel, params: dict, batch: _Batch, first_tuned: int) -> mx.array:
    caches: list = [None] * split.num_layers
    for j, (k, v) in enumerate(zip(params["keys"], params["values"], strict=True)):
        caches[first_tuned + j] = TrainableCache(mx.broadcast_to(k, (batch.batch, *k.shape[1:])),
                                                 mx.broadcast_to(v, (batch.batch, *v.shape[1:])))
    hidden = split.back.run(dict(batch.frontier), cache=caches)[split.back.output_names[0]]
    hidden = hidden.reshape(-1, hidden.shape[-1])[mx.array(batch.rows)]
    logits = split.scores(hidden).astype(mx.float32)
    picked = mx.take_along_axis(logits, batch.targets[:, None], axis=-1)[:, 0]
    return mx.mean(mx.logsumexp(logits, axis=-1) - picked)


def _mean_loss(split, params, batches, first_tuned) -> float:
    if not batches:
        return float("nan")
    total = sum(_loss(split, params, b, first_tuned).item() * len(b.targets) for b in batches)
    return total / sum(len(b.targets) for b in batches)


def tune(artifact: ProgramArtifact, prog: LoadedProgram, examples: Sequence[dict], *,
         progress: Progress | None = None, **options) -> ProgramArtifact:
    """A copy of ``artifact`` whose prefix was trained on ``examples`` (Adam, frozen base)."""
    opts = TuneOptions(**options)
    if opts.steps < 0 or opts.batch_size < 1 or opts.layers < 0:
        raise PawError("tuning needs steps >= 0, batch size >= 1 and layers >= 0")
    train, held = split_examples(examples, opts.holdout, opts.seed)
    layers = len(artifact.prefix)
    first_tuned = 0 if opts.layers == 0 else max(0, layers - opts.layers)
    started = time.perf_counter()
    with prog.lock:
        split = SplitModel(prog.model, first_tuned)
        order = list(train)
        random.Random(opts.seed).shuffle(order)
        train_batches = _prepare(split, prog, artifact, order, first_tuned, opts.batch_size)
        held_batches = _prepare(split, prog, artifact, held, first_tuned, opts.batch_size)
        params = {"keys": [k for k, _ in artifact.prefix[first_tuned:]],
                  "values": [v for _, v in artifact.prefix[first_tuned:]]}
        held_before = _mean_loss(split, params, held_batches, first_tuned)
        # Train loss on the first mini-batch only: a full pass costs as much as several steps.
        train_before = _mean_loss(split, params, train_batches[:1], first_tuned)
        optimizer = optim.Adam(learning_rate=opts.learning_rate)
        step_fn = mx.value_and_grad(lambda p, b: _loss(split, p, b, first_tuned))
        losses = []
        for step in range(opts.steps):
            loss, grads = step_fn(params, train_batches[step % len(train_batches)])
            params = optimizer.apply_gradients(grads, params)
            mx.eval(params, loss)
            losses.append(loss.item())
            if progress is not None:
                progress(step + 1, opts.steps, losses[-1])
        held_after = _mean_loss(split, params, held_batches, first_tuned)
        train_after = _mean_loss(split, params, train_batches[:1], first_tuned)
    prefix = list(artifact.prefix[:first_tuned]) + list(zip(params["keys"], params["values"], strict=True))
    tuning = {
        "method": "prefix-tuning", "optimizer": "adam", "steps": opts.steps,
        "learning_rate": opts.learning_rate, "batch_size": opts.batch_size,
        "tuned_layers": list(range(first_tuned, layers)), "train_examples": len(train),
        "heldout_examples": len(held), "first_batch_loss": [train_before, train_after],
        "heldout_loss": [held_before, held_after], "step_losses": [round(x, 5) for x in losses],
        "seconds": round(time.perf_counter() - started, 1),
    }
    return replace(artifact, prefix=prefix, tuning=tuning, directory=None)
