"""A compiled program as a Python callable: ``f = function(dir); f("input") -> str``."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from interp.errors import ArtifactError, InputError, PawError
from interp.lora import merged_model, with_adapters
from interp.paths import DEFAULT_MODEL
from paw_mlx.constrain import grammar_for
from paw_mlx.programs.adapter import LoraAdapter
from paw_mlx.programs.artifact import ProgramArtifact, check_against_base, read_artifact
from paw_mlx.programs.batch import ResidentPrefix, generate_batch, prefix_cache
from paw_mlx.programs.compile import compile, input_ids
from paw_mlx.programs.copy_rule import copy_constraint
from paw_mlx.programs.interpreter import interpreter
from paw_mlx.programs.recurrent_prefix import program_prefix
from paw_mlx.runtime import LoadedProgram

#: the most padded tokens (rows x longest row) one batch of a call feeds; a list of inputs
#: whose batch would be larger runs as several batches of rows of similar lengths, so one
#: long input does not pad every short one to its length
BATCH_TOKENS = 8192


def length_batches(lengths: list[int], budget: int = BATCH_TOKENS) -> list[list[int]]:
    """Row indices grouped into batches of at most ``budget`` padded tokens (one row at least):
    all rows in one batch when they fit, else rows sorted by length and packed greedily."""
    if not lengths or len(lengths) * max(lengths) <= budget:
        return [list(range(len(lengths)))]
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if batches and (len(batches[-1]) + 1) * lengths[i] <= budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


@dataclass(frozen=True)
class Completion:
    """One output of a call, and how it ended."""

    text: str
    #: tokens generated (the end-of-turn token not counted)
    tokens: int
    #: True when the output stopped at the token budget or the context's end, not by itself
    truncated: bool


class ProgramFunction:
    """Calls a program: a string in, a string out; a list in, a list out (one batch, or
    several when one input is much longer than the others: ``BATCH_TOKENS``; one input at a
    time on a base with recurrent state, whose layers take no padded rows).

    With an output constraint (``returns``, or the program's own), every output parses:
    it is one of the choices, matches the regex or is JSON valid for the schema.
    """

    def __init__(self, artifact: ProgramArtifact, base: LoadedProgram, max_new_tokens: int | None = None,
                 returns: Any = None):
        check_against_base(artifact, base)
        _check_budget(max_new_tokens)
        self.artifact = artifact
        self.base = base
        #: the base model as this program runs it: with its LoRA adapter, if it has one
        self.runner = adapted(base, artifact.adapter)
        self.max_new_tokens = max_new_tokens or artifact.generation.max_new_tokens
        #: whether the base keeps recurrent state: each call then starts from a copy of the prefix's
        #: whole cache list and runs alone (``causal_conv1d`` takes no padded rows)
        self.recurrent = base.program.recurrent
        #: the prefix in a cache of its own, which one-input calls run in without copying it; on a
        #: recurrent base, the prefix's states, copied for each call (``recurrent_prefix.py``)
        self._resident = (program_prefix(base, artifact, self.runner) if self.recurrent
                          else ResidentPrefix(artifact.prefix))
        returns = returns if returns is not None else artifact.returns
        self.grammar = None
        if returns is not None:
            self.grammar = grammar_for(base, returns, lead=artifact.layout.output_lead)
        #: the program's copy rule (``copy_rule.py``), enforced per input where no ``returns`` is
        self.copy_rule = artifact.copy_rule if self.grammar is None else None

    @property
    def spec(self) -> str:
        return self.artifact.spec

    def start_cache(self) -> list:
        """A new cache list holding the prefix, for one row to continue (``paw chat``'s program turns)."""
        if self.recurrent:
            return self._resident.cache()
        return prefix_cache(self.artifact.prefix, 1) if self.artifact.prefix else self.runner.make_cache()

    def token_ids(self, text: str) -> list[int]:
        """The ids a call feeds after the prefix."""
        return input_ids(self.base.tokenizer, self.artifact.layout, text)

    def call_ids(self, rows: list[list[int]], max_new_tokens: int | None = None,
                 texts: list[str] | None = None) -> list[list[int]]:
        """Output ids for each row of input ids (each checked against the vocabulary and context);
        ``max_new_tokens`` overrides the function's own budget for this call. ``texts``: each
        row's input text, which a copy rule holds outputs to (else read back from the ids)."""
        return self._generate(rows, max_new_tokens, texts)[0]

    def _input_text(self, ids: list[int]) -> str:
        """The input a call's ids hold (``token_ids``'s inverse, up to the lead): for a copy rule."""
        text = self.base.tokenizer.decode(ids, skip_special_tokens=False)
        suffix = self.artifact.layout.suffix_text
        return text[: -len(suffix)] if suffix and text.endswith(suffix) else text

    def _generate(self, rows: list[list[int]], max_new_tokens: int | None,
                  texts: list[str] | None = None) -> tuple[list[list[int]], list[bool]]:
        """``call_ids``'s outputs, and whether each ended by itself (not at the budget)."""
        _check_budget(max_new_tokens)
        rows = [self.base.check_ids(row, f"input {i} ids") for i, row in enumerate(rows)]
        longest = max((len(row) for row in rows), default=0)
        if self.artifact.prefix_length + longest >= self.base.context_length:
            raise InputError(f"an input of {longest} tokens after the {self.artifact.prefix_length}-token prefix "
                             f"fills the base model's context of {self.base.context_length}")
        outputs: list[list[int]] = [[] for _ in rows]
        ended = [True] * len(rows)
        batches = ([[i] for i in range(len(rows))] if self.recurrent
                   else length_batches([len(row) for row in rows], BATCH_TOKENS))
        if self.copy_rule is not None and texts is None:
            texts = [self._input_text(row) for row in rows]
        for batch in batches:
            constraints = None
            if self.grammar is not None:
                constraints = [self.grammar.start() for _ in batch]
            elif self.copy_rule is not None:
                lead = self.artifact.layout.output_lead
                constraints = [copy_constraint(self.copy_rule, self.base, texts[i], lead) for i in batch]
            batch_ended: list[bool] = []
            done = generate_batch(self.runner, self.artifact.prefix, [rows[i] for i in batch],
                                  max_new_tokens=max_new_tokens or self.max_new_tokens,
                                  temperature=self.artifact.generation.temperature, constraints=constraints,
                                  resident=self._resident, ended=batch_ended, row_numbers=batch)
            for i, ids, end in zip(batch, done, batch_ended, strict=True):
                outputs[i], ended[i] = ids, end
        return outputs, ended

    def complete(self, inputs: list[str]) -> list[Completion]:
        """Each input's output with how it ended: ``truncated`` outputs stopped at the token
        budget (``max_new_tokens``) or the context's end, and may be cut off mid-answer."""
        if isinstance(inputs, str):  # not its characters, one by one
            raise PawError("complete takes a list of strings (for one input: [text])")
        if not all(isinstance(i, str) for i in inputs):
            raise PawError("a program takes a string or a list of strings")
        if not inputs:
            return []
        outs, ended = self._generate([self.token_ids(i) for i in inputs], None, list(inputs))
        texts = [self.artifact.layout.output_text(self.base.tokenizer.decode_finished(o, skip_special_tokens=True))
                 for o in outs]
        if self.artifact.generation.strip:
            texts = [t.strip() for t in texts]
        return [Completion(t, len(o), not e) for t, o, e in zip(texts, outs, ended, strict=True)]

    def __call__(self, x: str | list[str]) -> str | list[str]:
        single = isinstance(x, str)
        texts = [c.text for c in self.complete([x] if single else list(x))]
        return texts[0] if single else texts


def _check_budget(max_new_tokens: Any) -> None:
    """A token budget is None (the default) or a positive int; anything else is one InputError line."""
    if max_new_tokens is not None and (type(max_new_tokens) is not int or max_new_tokens < 1):
        raise InputError(f"max_new_tokens must be a positive integer, not {max_new_tokens!r:.40}")


def adapted(base: LoadedProgram, adapter: LoraAdapter | None) -> LoadedProgram:
    """``base`` running with ``adapter`` added to its linear layers: merged into copies of
    the weights it targets where that is exact (float32 weights; as fast as the base),
    else by the load-time rewrite (the weights are shared). The lock that serialises
    generation on the base's weights is shared either way."""
    if adapter is None:
        return base
    try:
        scaled = adapter.scaled()
        model = merged_model(base.model, scaled)
        if model is None:  # merging would not equal the rewrite (see merged_model)
            model = with_adapters(base.model, [scaled])
    except ArtifactError as exc:
        raise ArtifactError(f"the program's adapter does not fit base model {base.name}: {exc}") from None
    return replace(base, model=model, lock=base.lock)


def stacked(base: LoadedProgram, adapters: list[LoraAdapter | None]) -> LoadedProgram:
    """``base`` holding several adapters at once, for a batch whose rows belong to different
    programs: each call passes ``extra_inputs={"adapter_index": int32 [batch]}`` (the position
    of each row's adapter in ``adapters``; None means no adapter). See docs/programs.md."""
    try:
        model = with_adapters(base.model, [a.scaled() if a is not None else None for a in adapters], indexed=True)
    except ArtifactError as exc:
        raise ArtifactError(f"an adapter does not fit base model {base.name}: {exc}") from None
    return replace(base, model=model, lock=base.lock)


def _base_for(artifact: ProgramArtifact, base: str | Path | None) -> LoadedProgram:
    if base is not None:
        return interpreter(base)
    if artifact.base_hint and (Path(artifact.base_hint) / "prog.json").is_file():
        return interpreter(artifact.base_hint)
    return interpreter(DEFAULT_MODEL)


def function(program: str | Path | ProgramArtifact, base: str | Path | None = None,
             max_new_tokens: int | None = None, returns: Any = None, *, verify: bool = False) -> ProgramFunction:
    """A callable for a compiled program directory, a programasweights ``.paw`` bundle, an
    in-memory artifact, or a .txt spec.

    The base model is ``base`` if given, else the one the program was compiled on (its
    recorded path), else the default 'smollm2'; a mismatch of fingerprints is an error.
    ``returns`` constrains outputs (a list of choices, ``{"regex": ...}``,
    ``{"json_schema": ...}``, ``{"json_object": True}``; see ``paw_mlx.constrain``),
    replacing the program's own constraint. ``verify`` checks the program's files
    against the sha256 in its manifest.json first.
    """
    if isinstance(program, ProgramArtifact):
        artifact = program
    else:
        path = Path(program)
        if path.suffix == ".paw" and path.is_file():
            from paw_mlx.programs.pawfile import load_bundle

            artifact = load_bundle(path, base if base is not None else DEFAULT_MODEL)
        elif path.suffix == ".txt" and path.is_file():
            artifact = compile("@" + str(path), base=base if base is not None else DEFAULT_MODEL)
        elif not path.exists():
            raise ArtifactError(f"no such program: {path}")
        else:
            artifact = read_artifact(path, verify=verify)
    return ProgramFunction(artifact, _base_for(artifact, base), max_new_tokens, returns)
