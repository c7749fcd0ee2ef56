"""Training a program on examples: a LoRA adapter, or the prefix's keys and values.

The base model stays frozen. Both methods train only the top ``layers`` decoder layers,
which keeps a CPU step cheap:

* the graph is cut just after the last frozen attention layer. Everything before the
  cut depends only on the frozen prefix and the example tokens, so it runs once per
  mini-batch; each step runs (and differentiates) only the part after the cut;
* the language-model head runs only at the positions whose next token is scored.

The loss is cross-entropy on the output tokens and the end-of-turn token. When the
prefix holds the examples as demonstrations (a few-shot prefix), each training row is
hidden its own demonstration, so the model cannot learn to copy answers out of the
prefix: what it learns must hold for inputs it has not seen. On a KV base a key mask
hides it; a base with recurrent state cannot honour one (its state has absorbed every
token before), so there each row runs alone behind its own prefix, the kept prefix's
layout without that demonstration (``own_prefixes``), as one sequence with no mask:
the base's run over that prefix (every layer's cache, computed once per distinct prefix)
is where the row's tokens start (``_prepare_rows``).
With validation rows, training stops early: the validation loss is measured every
``eval_every`` steps and the parameters of the best measurement are kept.

The cache that holds the prefix concatenates instead of writing into a buffer
(``KVCache`` uses slice assignment, which ``mx.value_and_grad`` cannot see through).
A LoRA adapter normally applies to the call's tokens only, after a prefix the base model
computed; with ``adapt_prefix`` it applies to the prefix too (how llama.cpp runs a
``.paw`` bundle), and each step recomputes the trained layers' prefix keys and values
through the adapter (a pass over the prefix, batch 1, in those layers).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np

from interp.errors import PawError
from interp.graph import GraphModel
from interp.lora import LinearSite, linear_sites, model_dtype, rewrite_with_lora
from interp.ops import REGISTRY
from interp.program import Program, names_in
from interp.schema import KV_CACHE_OPS
from paw_mlx.programs.adapter import LoraAdapter
from paw_mlx.programs.artifact import ProgramArtifact
from paw_mlx.programs.compile import compute_prefix, input_ids
from paw_mlx.runtime import LoadedProgram

Progress = Callable[[int, int, float], None]

#: module-name words that classify a linear layer for ``TrainOptions.targets``
_ATTENTION_WORDS = ("attn", "attention")
#: attention projections under a block whose name says nothing of attention (RecurrentGemma's
#: ``temporal_block.q_proj``, beside its recurrent blocks' ``temporal_block.linear_x``)
_ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj")


def is_attention_projection(module: str) -> bool:
    """Whether the linear layer ``module`` belongs to attention (what ``targets="attention"`` adapts)."""
    return any(w in module for w in _ATTENTION_WORDS) or module.rsplit(".", 1)[-1] in _ATTENTION_PROJECTIONS


@dataclass
class TrainOptions:
    """How a candidate is trained; the defaults were chosen on the dev tasks (docs/programs.md)."""

    method: str = "lora"  # "lora" or "prefix"
    steps: int = 40  # most steps (early stopping may end sooner)
    learning_rate: float = 1e-3
    batch_size: int = 4
    layers: int = 12  # train this many top decoder layers; 0 trains all of them
    rank: int = 8  # LoRA rank
    alpha: float = 16.0  # LoRA scale alpha / rank
    targets: str = "attention"  # LoRA on "attention" projections, or "all" linear layers
    #: LoRA also applies to the prefix (its keys and values are recomputed through the adapter
    #: every step), as a .paw bundle's runtime (llama.cpp) runs it; off: the prefix stays the base's
    adapt_prefix: bool = False
    eval_every: int = 4  # steps between validation losses (with validation rows)
    patience: int = 3  # validation losses without improvement before stopping
    seed: int = 0

    def check(self) -> None:
        if self.method not in ("lora", "prefix"):
            raise PawError(f"unknown training method {self.method!r}: 'lora' or 'prefix'")
        if self.steps < 0 or self.batch_size < 1 or self.layers < 0 or self.rank < 1 or self.eval_every < 1:
            raise PawError("training needs steps >= 0, batch size >= 1, layers >= 0, rank >= 1, eval_every >= 1")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise PawError(f"the learning rate must be a positive number, not {self.learning_rate}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise PawError(f"the LoRA alpha must be a positive number, not {self.alpha}")
        if self.targets not in ("attention", "all"):
            raise PawError(f"unknown LoRA targets {self.targets!r}: 'attention' or 'all'")


@dataclass
class TrainResult:
    """What training produced: the new prefix (prefix method) or adapter (LoRA), and its history."""

    prefix: list[tuple[mx.array, mx.array]] | None
    adapter: LoraAdapter | None
    best_step: int
    steps_run: int
    #: (step, mean training loss since the last entry, validation loss or None)
    history: list[tuple[int, float, float | None]]
    seconds: float
    tuned_layers: list[int]
    #: the training loss of every step
    losses: list[float]

    def report(self, options: TrainOptions) -> dict:
        info = {"method": options.method, "options": asdict(options), "best_step": self.best_step,
                "steps_run": self.steps_run, "tuned_layers": self.tuned_layers, "seconds": round(self.seconds, 1),
                "history": [[s, round(t, 4), None if v is None else round(v, 4)] for s, t, v in self.history],
                "step_losses": [round(x, 4) for x in self.losses]}
        if self.adapter is not None:
            info["adapter"] = self.adapter.summary()
        return info


class TrainableCache:
    """A cache for training: the prefix (a differentiable array) joined to the new keys."""

    def __init__(self, keys: mx.array, values: mx.array):
        self.keys, self.values = keys, values
        self.offset = keys.shape[2]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        return mx.concatenate([self.keys, keys], axis=2), mx.concatenate([self.values, values], axis=2)


class CaptureCache:
    """An empty cache that keeps what a pass writes: the prefix's keys and values of one layer."""

    offset = 0

    def __init__(self):
        self.keys = self.values = None

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self.keys, self.values = keys, values
        return keys, values


# ----------------------------------------------------------------------------- graph split


def _sub_model(model: GraphModel, nodes: list, outputs: list[str]) -> GraphModel:
    spec = dict(model.program.spec, outputs=[{"name": n} for n in outputs])
    return GraphModel(replace(model.program, spec=spec, nodes=nodes), model.consts, compile_decode=False)


class SplitModel:
    """The base graph cut in three: frozen front, trainable back, and the LM head."""

    def __init__(self, model: GraphModel, first_tuned_layer: int):
        nodes = model.program.nodes
        frozen = [i for i, n in enumerate(nodes) if n.op in KV_CACHE_OPS and n.attrs["layer"] < first_tuned_layer]
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
            for name in [*names_in(node.inputs), *names_in(list(node.attrs.values()))]:
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


# ----------------------------------------------------------------------------- batches


@dataclass
class _Batch:
    frontier: dict
    rows: mx.array  # flat indices into [batch * length] of scored positions
    targets: mx.array
    batch: int
    key_mask: mx.array | None  # [batch, prefix + length]: False on a row's own demonstration
    key_positions: mx.array | None  # [1, prefix + length]: the hidden demonstration keeps its positions
    #: a base with recurrent state (one row): the whole cache list after the row's own prefix, which
    #: each step starts from a copy of; None with ``adapt_prefix`` (the prefix is in the row's tokens)
    states: list | None = None


def end_token(prog: LoadedProgram) -> int:
    """The token that ends an output (the tokenizer's EOS, else the model's lowest EOS id)."""
    tok = prog.tokenizer
    if tok.eos_token is not None and tok.token_to_id(tok.eos_token) is not None:
        return tok.token_to_id(tok.eos_token)
    if not prog.eos_token_ids:
        raise PawError("the base model declares no end-of-sequence token to stop its outputs")
    return min(prog.eos_token_ids)


def _encode(prog: LoadedProgram, artifact: ProgramArtifact, row: dict, eos: int) -> tuple[list[int], int]:
    prompt = input_ids(prog.tokenizer, artifact.layout, row["input"])
    # literal, as a call can write it: a special token's text in an answer is text, not a stop
    answer = prog.tokenizer.encode_literal(artifact.layout.output_lead + row["output"]) + [eos]
    return prompt + answer, len(prompt)


def _caches(prefix: Sequence[tuple[mx.array, mx.array]], layers: Iterable[int], batch: int, total: int) -> list:
    caches: list = [None] * total
    for layer in layers:
        k, v = prefix[layer]
        caches[layer] = TrainableCache(mx.broadcast_to(k, (batch, *k.shape[1:])),
                                       mx.broadcast_to(v, (batch, *v.shape[1:])))
    return caches


def _prepare(split: SplitModel, prog: LoadedProgram, artifact: ProgramArtifact, rows: Sequence[dict],
             hidden: Sequence[tuple[int, int] | None], first_tuned: int, batch_size: int) -> list[_Batch]:
    """Encode rows into right-padded mini-batches and run the frozen front once for each."""
    eos = end_token(prog)
    start = artifact.prefix_length
    batches = []
    for i in range(0, len(rows), batch_size):
        group = [_encode(prog, artifact, r, eos) for r in rows[i : i + batch_size]]
        spans = list(hidden[i : i + batch_size])
        width = max(len(ids) for ids, _ in group)
        tokens = np.zeros((len(group), width), dtype=np.int32)
        flat, targets = [], []
        for b, (ids, n_prompt) in enumerate(group):
            tokens[b, : len(ids)] = ids
            for t in range(n_prompt - 1, len(ids) - 1):  # position t predicts token t + 1
                flat.append(b * width + t)
                targets.append(ids[t + 1])
        key_mask = None
        if any(span is not None for span in spans):
            mask = np.ones((len(group), start + width), dtype=bool)
            for b, span in enumerate(spans):
                if span is not None:
                    mask[b, span[0]:span[1]] = False
            key_mask = mx.array(mask)
        positions = np.broadcast_to(np.arange(start, start + width, dtype=np.int32), tokens.shape)
        inputs = {"input_ids": mx.array(tokens), "position_ids": mx.array(positions)}
        caches = _caches(artifact.prefix, range(first_tuned), len(group), split.num_layers)
        keys = mx.arange(start + width, dtype=mx.int32)[None]  # every key at its column
        frontier = split.front.run(inputs, cache=caches, key_mask=key_mask, key_positions=keys)
        mx.eval([v for v in frontier.values() if isinstance(v, mx.array)])
        batches.append(_Batch(frontier, mx.array(flat), mx.array(targets), len(group), key_mask, keys))
    return batches


def _row_caches(states: list, layers: int) -> list:
    """A cache list continuing ``states`` (a base run's cache list): each attention layer's keys and
    values as a ``TrainableCache``, each recurrent state a copy (a run writes into it)."""
    caches = [TrainableCache(*states[i].state) for i in range(layers)]
    return caches + [state.copy() for state in states[layers:]]


def _prepare_rows(split: SplitModel, prog: LoadedProgram, artifact: ProgramArtifact, rows: Sequence[dict],
                  prefixes: Sequence[list[int] | None], adapt_prefix: bool) -> list[_Batch]:
    """A base with recurrent state: one batch per row, the row behind its own prefix (the kept
    prefix when None) as one sequence, and the frozen front run once over its tokens.

    Without ``adapt_prefix`` the prefix is the base's: its run (every layer's KV cache and recurrent
    state, once per distinct prefix) is where the row starts. With it, the adapter applies to the
    prefix too, so the row's tokens are the prefix's and its own, and each step runs them all.
    """
    eos = end_token(prog)
    layers = prog.program.num_layers
    runs: dict[tuple[int, ...], list] = {}
    batches = []
    for row, own in zip(rows, prefixes, strict=True):
        prefix = list(artifact.prefix_ids if own is None else own)
        ids, n_prompt = _encode(prog, artifact, row, eos)
        states, start = None, len(prefix)
        if adapt_prefix:
            ids, n_prompt, start = prefix + ids, len(prefix) + n_prompt, 0
        else:
            if tuple(prefix) not in runs:
                runs[tuple(prefix)] = prog.make_cache()
                prog.model(mx.array([prefix], dtype=mx.int32), cache=runs[tuple(prefix)])
                mx.eval([state.state for state in runs[tuple(prefix)]])
            states = runs[tuple(prefix)]
        inputs = {"input_ids": mx.array([ids], dtype=mx.int32),
                  "position_ids": mx.arange(start, start + len(ids), dtype=mx.int32)[None]}
        frontier = split.front.run(inputs, cache=None if states is None else _row_caches(states, layers))
        mx.eval([v for v in frontier.values() if isinstance(v, mx.array)])
        scored = range(n_prompt - 1, len(ids) - 1)  # position t predicts token t + 1
        batches.append(_Batch(frontier, mx.array(list(scored)), mx.array([ids[t + 1] for t in scored]), 1,
                              None, None, states))
    return batches


def first_tuned_layer(program: Program, options: TrainOptions) -> int:
    """The lowest decoder layer training touches: the top ``options.layers`` (0: all) of the program's
    attention calls."""
    calls = sum(1 for node in program.nodes if node.op == "attention")
    return 0 if options.layers == 0 else max(0, calls - options.layers)


def first_tuned_slot(program: Program, options: TrainOptions) -> int:
    """The lowest KV cache slot training touches: the one after the last frozen attention call's. It is
    ``first_tuned_layer`` but where an indexer (``index_topk``) takes a slot before its layer's attention,
    which is then tuned with it (the cut never falls between an indexer and the attention it serves)."""
    frozen = first_tuned_layer(program, options)
    slots = sorted(node.attrs["layer"] for node in program.nodes if node.op == "attention")
    return slots[frozen - 1] + 1 if frozen else 0


def lora_targets(program: Program, options: TrainOptions) -> dict[int, list[LinearSite]]:
    """The linear layers a LoRA adapter trained with ``options`` adapts, by program node.

    Reads only ``prog.json`` (the weights' shapes are in it), so ``paw compile`` checks the
    rank against the layers before the base model's weights load. Raises ``PawError`` when
    no layer qualifies, or the rank is more than the narrowest one's features.
    """
    first = first_tuned_layer(program, options)
    nodes: dict[int, list[LinearSite]] = {}
    for site in linear_sites(program).values():
        wanted = options.targets == "all" or is_attention_projection(site.module)
        if site.layer is not None and site.layer >= first and wanted:
            nodes.setdefault(site.node, []).append(site)
    if not nodes:
        raise PawError("the base model has no linear layers a LoRA adapter can target")
    narrowest = min(min(site.in_features, site.out_features) for group in nodes.values() for site in group)
    if options.rank > narrowest:  # a higher rank adds nothing a rank of `narrowest` cannot do, and costs memory
        raise PawError(f"LoRA rank {options.rank} is more than the narrowest layer it adapts ({narrowest} "
                       f"features); use a rank of at most {narrowest}")
    return nodes


# ----------------------------------------------------------------------------- the trainer


class _Problem:
    """One training problem: the split graph, the parameters and how they enter a step."""

    def __init__(self, prog: LoadedProgram, artifact: ProgramArtifact, options: TrainOptions):
        layers = len(artifact.prefix)
        self.first_tuned = first_tuned_slot(prog.program, options)
        self.layers = layers
        self.options = options
        self.artifact = artifact
        model = prog.model
        self.lora_nodes: dict[int, tuple[str, str]] = {}
        if options.method == "lora":
            model, self.params = self._lora_model(prog, options)
        else:
            self.params = {"keys": [k for k, _ in artifact.prefix[self.first_tuned:]],
                           "values": [v for _, v in artifact.prefix[self.first_tuned:]]}
        self.split = SplitModel(model, self.first_tuned)
        #: a base with recurrent state: each row runs behind its own prefix (``_prepare_rows``)
        self.recurrent = prog.program.recurrent
        self.prefix_frontier = None
        if options.method == "lora" and options.adapt_prefix and not self.recurrent:
            ids = mx.array([artifact.prefix_ids], dtype=mx.int32)
            positions = mx.arange(ids.shape[1], dtype=mx.int32)[None]
            caches = [CaptureCache() for _ in range(layers)]
            self.prefix_frontier = self.split.front.run({"input_ids": ids, "position_ids": positions}, cache=caches)
            mx.eval([v for v in self.prefix_frontier.values() if isinstance(v, mx.array)])

    def adapted_prefix(self, params: dict) -> list[tuple[mx.array, mx.array]]:
        """The prefix's keys and values with the adapter applied to its tokens (``adapt_prefix``)."""
        inputs = dict(self.prefix_frontier)
        scale = self.options.alpha / self.options.rank
        for a_name, b_name in self.lora_nodes.values():
            inputs[a_name], inputs[b_name] = params[a_name], params[b_name] * scale
        caches: list = [None] * self.layers
        for layer in range(self.first_tuned, self.layers):
            caches[layer] = CaptureCache()
        self.split.back.run(inputs, cache=caches)
        prefix = list(self.artifact.prefix)
        for layer in range(self.first_tuned, self.layers):
            prefix[layer] = (caches[layer].keys, caches[layer].values)
        return prefix

    def _lora_model(self, prog: LoadedProgram, options: TrainOptions) -> tuple[GraphModel, dict]:
        nodes = lora_targets(prog.program, options)
        self.sites = nodes
        program, names = rewrite_with_lora(prog.program, sorted(nodes), indexed=False)
        dtype = model_dtype(prog.model)
        consts = dict(prog.model.consts)
        params = {}
        rng = np.random.default_rng(options.seed)
        for node, (a_name, b_name) in names.items():
            site = nodes[node][0]
            bound = 1.0 / math.sqrt(site.in_features)
            a = rng.uniform(-bound, bound, (1, options.rank, site.in_features)).astype(np.float32)
            params[a_name] = mx.array(a).astype(dtype)
            params[b_name] = mx.zeros((1, site.node_out_features, options.rank), dtype=dtype)
            consts[a_name], consts[b_name] = params[a_name], params[b_name]
        self.lora_nodes = names
        return GraphModel(program, consts, compile_decode=False), params

    def loss(self, params: dict, group: list[_Batch]) -> mx.array:
        """The mean loss over the scored positions of ``group`` (one mini-batch: one batch on a KV
        base, one batch per row on a base with recurrent state)."""
        if len(group) == 1:
            return self.batch_loss(params, group[0])
        total = sum(len(b.targets) for b in group)
        return sum(self.batch_loss(params, b) * (len(b.targets) / total) for b in group)

    def batch_loss(self, params: dict, batch: _Batch) -> mx.array:
        split = self.split
        inputs = dict(batch.frontier)
        if self.recurrent:  # the row's own prefix is in its states (or, adapt_prefix, in its tokens)
            caches = None if batch.states is None else _row_caches(batch.states, self.layers)
            scale = self.options.alpha / self.options.rank
            for a_name, b_name in self.lora_nodes.values():
                inputs[a_name], inputs[b_name] = params[a_name], params[b_name] * scale
        elif self.options.method == "lora":
            scale = self.options.alpha / self.options.rank
            prefix = self.adapted_prefix(params) if self.prefix_frontier is not None else self.artifact.prefix
            caches = _caches(prefix, range(self.first_tuned, self.layers), batch.batch, self.layers)
            for a_name, b_name in self.lora_nodes.values():
                inputs[a_name], inputs[b_name] = params[a_name], params[b_name] * scale
        else:
            caches = [None] * self.layers
            for j, (k, v) in enumerate(zip(params["keys"], params["values"], strict=True)):
                caches[self.first_tuned + j] = TrainableCache(mx.broadcast_to(k, (batch.batch, *k.shape[1:])),
                                                              mx.broadcast_to(v, (batch.batch, *v.shape[1:])))
        hidden = split.back.run(inputs, cache=caches, key_mask=batch.key_mask,
                                key_positions=batch.key_positions)[split.back.output_names[0]]
        hidden = hidden.reshape(-1, hidden.shape[-1])[batch.rows]
        logits = split.scores(hidden).astype(mx.float32)
        picked = mx.take_along_axis(logits, batch.targets[:, None], axis=-1)[:, 0]
        return mx.mean(mx.logsumexp(logits, axis=-1) - picked)

    def mean_loss(self, params: dict, batches: list[_Batch]) -> float:
        total = sum(self.batch_loss(params, b).item() * len(b.targets) for b in batches)
        return total / max(1, sum(len(b.targets) for b in batches))

    def adapter(self, params: dict) -> LoraAdapter:
        """The trained LoRA by module: a fused node's modules share its ``a``."""
        modules = {}
        for node, (a_name, b_name) in self.lora_nodes.items():
            a = np.array(params[a_name][0].astype(mx.float32))
            b = np.array(params[b_name][0].astype(mx.float32))
            for site in self.sites[node]:
                modules[site.module] = (a, b[site.rows[0]:site.rows[1]])
        return LoraAdapter(modules, self.options.alpha)

    def prefix(self, params: dict) -> list[tuple[mx.array, mx.array]]:
        if self.options.method == "lora":
            prefix = self.adapted_prefix(params)
            mx.eval(prefix)
            return [(mx.array(k), mx.array(v)) for k, v in prefix]
        return list(self.artifact.prefix[: self.first_tuned]) + list(zip(params["keys"], params["values"], strict=True))


def train(prog: LoadedProgram, artifact: ProgramArtifact, rows: Sequence[dict], options: TrainOptions, *,
          hidden_spans: Sequence[tuple[int, int] | None] | None = None,
          own_prefixes: Sequence[list[int] | None] | None = None, validation: Sequence[dict] = (),
          progress: Progress | None = None) -> TrainResult:
    """Train ``artifact`` (its layout and prefix) on ``rows``; see the module docstring.

    Row i's own demonstration is hidden from it: on a KV base ``hidden_spans[i]`` (its prefix
    positions, or None); on a base with recurrent state ``own_prefixes[i]`` (the prefix ids
    without it, or None: the kept prefix), and only a LoRA trains there. With ``validation``
    rows, stops early and returns the best parameters seen; without, runs ``options.steps`` steps.
    """
    options.check()
    if not rows:
        raise PawError("training needs at least one example")
    recurrent = prog.program.recurrent
    if recurrent and options.method != "lora":
        raise PawError(f"a {options.method} cannot be trained on a base with recurrent state (docs/programs.md)")
    if recurrent and hidden_spans is not None and any(span is not None for span in hidden_spans):
        raise ValueError("a base with recurrent state hides a row's demonstration with its own prefix, not a span")
    spans = list(hidden_spans) if hidden_spans is not None else [None] * len(rows)
    own = list(own_prefixes) if own_prefixes is not None else [None] * len(rows)
    started = time.perf_counter()
    with prog.lock:
        problem = _Problem(prog, artifact, options)
        order = list(range(len(rows)))
        random.Random(options.seed).shuffle(order)
        order = order[: max(1, options.steps) * options.batch_size]  # the rows the steps reach, no others
        if recurrent:
            fit = _prepare_rows(problem.split, prog, artifact, [rows[i] for i in order], [own[i] for i in order],
                                options.adapt_prefix)
            train_batches = [fit[i : i + options.batch_size] for i in range(0, len(fit), options.batch_size)]
            val_batches = _prepare_rows(problem.split, prog, artifact, list(validation), [None] * len(validation),
                                        options.adapt_prefix)
        else:
            fit = _prepare(problem.split, prog, artifact, [rows[i] for i in order], [spans[i] for i in order],
                           problem.first_tuned, options.batch_size)
            train_batches = [[batch] for batch in fit]
            val_batches = _prepare(problem.split, prog, artifact, list(validation), [None] * len(validation),
                                   problem.first_tuned, options.batch_size)
        params = problem.params
        optimizer = optim.Adam(learning_rate=options.learning_rate)
        step_fn = mx.value_and_grad(problem.loss)
        history: list[tuple[int, float, float | None]] = []
        best = (problem.mean_loss(params, val_batches), 0, params) if val_batches else None
        if best is not None:
            history.append((0, float("nan"), best[0]))
        since_best, window, step, losses = 0, [], 0, []
        for step in range(1, options.steps + 1):
            loss, grads = step_fn(params, train_batches[(step - 1) % len(train_batches)])
            params = optimizer.apply_gradients(grads, params)
            mx.eval(params, loss)
            window.append(loss.item())
            losses.append(window[-1])
            if progress is not None:
                progress(step, options.steps, window[-1])
            if best is not None and step % options.eval_every == 0:
                val = problem.mean_loss(params, val_batches)
                history.append((step, sum(window) / len(window), val))
                window = []
                if val < best[0] - 1e-4:
                    best, since_best = (val, step, params), 0
                else:
                    since_best += 1
                    if since_best >= options.patience:
                        break
        if best is None:
            if window:
                history.append((step, sum(window) / len(window), None))
            best = (float("nan"), step, params)
        _, best_step, params = best
        adapter = problem.adapter(params) if options.method == "lora" else None
        prefix = problem.prefix(params) if options.method == "prefix" or problem.prefix_frontier is not None else None
        if recurrent and options.adapt_prefix:
            from paw_mlx.programs.function import adapted  # function.py imports what imports this module

            prefix = compute_prefix(adapted(prog, adapter), artifact.prefix_ids)
    return TrainResult(prefix, adapter, best_step, step, history, time.perf_counter() - started,
                       list(range(problem.first_tuned, problem.layers)), losses)
