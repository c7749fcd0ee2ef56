"""Choosing a program on held-out data: each candidate is scored by k-fold cross-validation
inside the training examples, and the best one is rebuilt on all of them.

Candidates, from cheapest:

* ``spec``: the spec alone as the system message;
* ``fewshot``: the spec plus the examples as demonstrations (user/assistant turns) inside
  the cached prefix, free at call time since the prefix is computed once;
* ``prefix``: the few-shot prefix's keys and values tuned by gradient descent;
* ``lora``: a LoRA adapter on the top layers' projections, trained with the few-shot
  prefix in front (``paw_mlx/programs/train.py``);
* ``prefix+lora``: the tuned prefix, then a LoRA adapter trained behind it (two stages:
  the first is the ``prefix`` candidate's own training, shared with it in each fold);
  tried only when asked for (``DEFAULT_CANDIDATES``).

With ``n`` examples and ``k`` folds (by default at most 8: leave-one-out for the 5-8
examples a program usually has), a candidate is fitted ``k`` times on the examples
outside one fold (demonstrations included: a fold's own examples are never in its
prefix) and scored by exact match on the fold, so every example is predicted once by a
program that never saw it. With ``repeats`` > 1 (repeated k-fold) the examples are
shuffled into folds again, each partition from its own seed, and every example is
predicted once per partition (off by default: not better on the dev tasks). Trained
candidates stop early on their fold's validation loss. The kept program is then built on
all the examples: a ``lora`` program is the few-shot prefix of all of them with the mean
of the folds' adapters (a bagged adapter: each was validated at its own best step, and
their mean generalized better on the dev tasks than one adapter retrained on all the
examples); the other trained candidates train again on all the examples, for the mean of
the folds' best step counts. The kept candidate has the highest held-out exact
match. On a tie a bagged LoRA wins (its program averages adapters fitted on every example
between them, so its cross-validated score, each fold's adapter alone, understates it;
measured in docs/programs.md, "Choosing the defaults"), else the simpler candidate
(``PREFERENCE``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from fractions import Fraction
from pathlib import Path

from interp.errors import ConstraintError, PawError
from interp.program import read_program
from paw_mlx.programs.adapter import MAX_MEAN_RANK, LoraAdapter, mean_adapter
from paw_mlx.programs.artifact import GenerationSettings, ProgramArtifact
from paw_mlx.programs.compile import (
    OUTPUT_MARGIN,
    compute_prefix,
    demo_spans,
    layout_prefix_ids,
    longest_output,
    prefixes_without,
    prompt_layout,
)
from paw_mlx.programs.copy_rule import infer_copy_rule
from paw_mlx.programs.demos import choose_demos, demo_budget
from paw_mlx.programs.examples import partitions
from paw_mlx.programs.train import TrainOptions, TrainResult, lora_targets, train
from paw_mlx.runtime import LoadedProgram

PREFIX_LORA = "prefix+lora"
CANDIDATES = ("spec", "fewshot", "prefix", "lora", PREFIX_LORA)
#: what ``paw compile --examples`` tries unless told otherwise: all but ``prefix+lora``, well
#: below the mean-adapter ``lora`` on the dev tasks, whose second training per fold would
#: cost the most with leave-one-out folds (docs/programs.md)
DEFAULT_CANDIDATES = ("spec", "fewshot", "prefix", "lora")
#: candidates trained with each row's own demonstration hidden from it (``Builder._train``)
TRAINED = ("prefix", "lora", PREFIX_LORA)
#: candidates with a tuned prefix, which a base with recurrent state does not run: a tuned prefix is
#: attention layers' keys and values, and the recurrent layers' state after it would be neither the
#: base's run over the prefix ids nor anything trained (docs/programs.md)
TUNED_PREFIX = ("prefix", PREFIX_LORA)
#: tie-break order: simpler first
PREFERENCE = ("fewshot", "spec", "lora", "prefix", PREFIX_LORA)
#: candidates whose kept program averages the folds' adapters instead of training again
BAGGED = ("lora",)

#: progress(description, done, total) in work units (training steps, scored folds)
Progress = Callable[[str, int, int], None]


@dataclass
class SelectOptions:
    candidates: tuple[str, ...] = DEFAULT_CANDIDATES
    #: at most this many folds: with 8 examples or fewer, leave-one-out (each fold's
    #: adapter sees all but one example, and a bagged LoRA averages 8 of them; better
    #: than 4 folds on the dev tasks, docs/programs.md)
    folds: int = 8
    #: cross-validation partitions, each from its own shuffle (repeated k-fold): every
    #: example is predicted ``repeats`` times, by programs fitted on different others
    repeats: int = 1
    lora: TrainOptions = field(default_factory=lambda: TrainOptions(method="lora"))
    prefix: TrainOptions = field(default_factory=lambda: TrainOptions(method="prefix", learning_rate=1e-2))
    seed: int = 0
    #: False: a call's input is appended as given, never after a lead (``compile.choose_leads``),
    #: as a ``.paw`` bundle's runtime appends it
    input_lead: bool = True
    #: infer the copy rule from the examples (``copy_rule.py``): when every example answers with
    #: words of its input, so must every call; False: never (nor does a ``.paw`` bundle's runtime)
    copy_rule: bool = True

    def check(self) -> None:
        unknown = [c for c in self.candidates if c not in CANDIDATES]
        if unknown or not self.candidates:
            raise PawError(f"unknown candidate {', '.join(unknown) or '(none given)'}: "
                           f"choose from {', '.join(CANDIDATES)}")
        for name in ("folds", "repeats"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise PawError(f"cross-validation {name} must be a whole number, not {value!r:.40}")
        for name in ("input_lead", "copy_rule"):
            if not isinstance(getattr(self, name), bool):
                raise PawError(f"{name} must be true or false, not {getattr(self, name)!r:.40}")
        if self.folds < 2:
            raise PawError("cross-validation needs at least 2 folds")
        if not 1 <= self.repeats <= MAX_REPEATS:
            raise PawError(f"cross-validation repeats must be 1-{MAX_REPEATS}, got {self.repeats}")
        self.lora.check()
        self.prefix.check()

    def check_base(self, base: str | Path) -> str | None:
        """Raise ``PawError`` if a candidate asked for cannot be built on the base program at
        ``base`` (a tuned prefix on a base with recurrent state, a LoRA with no layer to adapt or
        a rank wider than a layer it adapts), read from ``prog.json`` before any weight loads.
        The default candidates lose those the base cannot build instead; returns a note saying
        so, or None."""
        program = read_program(base)
        why: dict[str, str] = {}
        if program.recurrent:
            kind = program.model_info.get("model_type") or "hybrid"
            for name in TUNED_PREFIX:
                why[name] = (f"it keeps recurrent state ({kind}), and a tuned prefix is attention layers' keys and "
                             "values, which the recurrent layers' state after the prefix does not follow")
        lora_named = [name for name in self.candidates if self.training(name) is self.lora]
        if lora_named:
            try:
                lora_targets(program, replace(self.lora, rank=1))  # is there a layer to adapt at all?
            except PawError as exc:
                for name in lora_named:
                    why.setdefault(name, str(exc))
        blocked = [name for name in self.candidates if name in why]
        if blocked and self.candidates != DEFAULT_CANDIDATES:
            kept = [name for name in CANDIDATES if name not in why]
            raise PawError(f"candidate {blocked[0]} cannot be built on {program.directory}: {why[blocked[0]]}; "
                           f"{', '.join(kept)} work on it (--candidates {','.join(kept)})")
        if any(name not in why for name in lora_named):
            lora_targets(program, self.lora)  # the rank against the layers it adapts
        if not blocked:
            return None
        self.candidates = tuple(name for name in self.candidates if name not in why)
        return "; ".join(f"candidate {name} is not tried: {why[name]} (docs/programs.md)" for name in blocked)

    def training(self, name: str) -> TrainOptions | None:
        """How candidate ``name`` is trained (for ``prefix+lora``: its second, LoRA stage)."""
        return {"lora": self.lora, "prefix": self.prefix, PREFIX_LORA: self.lora}.get(name)


#: the most cross-validation partitions (each costs a fit per fold of every trained candidate)
MAX_REPEATS = 10


@dataclass
class CandidateScore:
    name: str
    correct: int = 0
    total: int = 0
    seconds: float = 0.0
    fold_seconds: list[float] = field(default_factory=list)
    best_steps: list[int] = field(default_factory=list)
    #: ``prefix+lora``: the best step of its first stage (the prefix tuning) in each fold
    stage_steps: list[int] = field(default_factory=list)
    #: the held-out prediction of each example (in the first partition, with repeats)
    outputs: list[str] = field(default_factory=list)
    #: each fold's trained adapter (``BAGGED`` candidates: their mean is the kept adapter)
    adapters: list[LoraAdapter] = field(default_factory=list)

    @property
    def exact_match(self) -> float:
        return self.correct / self.total if self.total else 0.0

    @property
    def rate(self) -> Fraction:
        """Held-out exact matches per prediction, exactly (the spec is scored once, the
        others once per partition, so counts alone do not compare)."""
        return Fraction(self.correct, self.total or 1)


def exact(output: str, wanted: str) -> bool:
    return output.strip() == wanted.strip()


class Builder:
    """Builds candidate programs of one spec on one base model."""

    def __init__(self, prog: LoadedProgram, spec: str, base_hint: str, generation: GenerationSettings,
                 returns: dict | None = None, leads: tuple[str, str] = ("", ""), copy_rule: bool = False):
        self.prog, self.spec, self.base_hint = prog, spec, base_hint
        self.generation, self.returns = generation, returns
        #: infer each candidate's copy rule from the rows it is fitted on (never with ``returns``)
        self.copy_rule = copy_rule and returns is None
        self.leads = leads  # before each input and output (``compile.choose_leads``): one layout for every candidate
        self._prefixes: dict[tuple, ProgramArtifact] = {}
        self._tuned: dict[tuple, tuple[ProgramArtifact, TrainResult]] = {}
        self._turn_tokens: int | None = None

    def demos(self, rows: Sequence[dict]) -> list[dict]:
        """The rows a prefix shows as demonstrations: all of them up to a budget, else a spread
        (``paw_mlx/programs/demos.py``). A row holding a special token's text (``<|im_end|>``)
        is never shown: rendered into the prefix, that text would end its turn early (it still
        trains and is scored, as calls read it: as text)."""
        special = self.prog.tokenizer.holds_special_text
        showable = [r for r in rows if not (special(r["input"]) or special(r["output"]))]
        return choose_demos(showable, self._demo_cost, demo_budget(self.prog.context_length))

    def _demo_cost(self, row: dict) -> int:
        """Prefix tokens one demonstration takes: its input and output and the turns around them."""
        if self._turn_tokens is None:
            tokenizer, probe = self.prog.tokenizer, {"input": "a", "output": "b"}
            one, none = (len(layout_prefix_ids(tokenizer, prompt_layout(tokenizer, self.spec, d, self.leads)))
                         for d in ([probe], []))
            self._turn_tokens = max(0, one - none - 2)
        encode = self.prog.tokenizer.encode
        return (len(encode(row["input"], add_special_tokens=False))
                + len(encode(row["output"], add_special_tokens=False)) + self._turn_tokens)

    def prompted(self, rows: Sequence[dict]) -> ProgramArtifact:
        """The untrained program whose prefix shows ``rows`` (or a spread of them, ``demos``)
        as demonstrations (cached: folds share them)."""
        demos = self.demos(rows)
        rule = infer_copy_rule(rows) if self.copy_rule else None
        key = (tuple((d["input"], d["output"]) for d in demos), rule)
        if key not in self._prefixes:
            demos = [{"input": d["input"], "output": d["output"]} for d in demos]
            layout = prompt_layout(self.prog.tokenizer, self.spec, demos, self.leads)
            ids = layout_prefix_ids(self.prog.tokenizer, layout)
            self._prefixes[key] = ProgramArtifact(
                spec=self.spec, base_fingerprint=self.prog.fingerprint, base_hint=self.base_hint, layout=layout,
                prefix_ids=ids, prefix=compute_prefix(self.prog, ids), generation=self.generation,
                returns=self.returns, demos=demos, copy_rule=rule)
        return self._prefixes[key]

    def build(self, name: str, rows: Sequence[dict], options: TrainOptions | None, *,
              validation: Sequence[dict] = (), progress: Callable[[int, int, float], None] | None = None,
              stage: TrainOptions | None = None) -> tuple[ProgramArtifact, TrainResult | None]:
        """Candidate ``name`` fitted on ``rows`` (validation rows only steer early stopping).

        ``prefix+lora`` trains in two stages: ``stage`` (prefix tuning options) on the
        few-shot prefix, then ``options`` (a LoRA) behind the tuned prefix. The LoRA stage
        starts where the prefix stage ended (its adapter starts at zero), so with
        validation rows its early stopping keeps the adapter only if it improves on the
        tuned prefix.
        """
        if name == "spec":
            return self.prompted([]), None
        artifact = self.prompted(rows)
        if name == "fewshot":
            return artifact, None
        if name == "prefix":
            return self._tuned_prefix(artifact, rows, options, validation, progress)
        first = None
        if name == PREFIX_LORA:
            if stage is None:
                raise PawError("the prefix+lora candidate needs the options of its prefix stage")
            artifact, first = self._tuned_prefix(artifact, rows, stage, validation, progress)
        trained, result = self._train(artifact, rows, options, validation, progress)
        if first is not None:
            trained.tuning = dict(trained.tuning, method=PREFIX_LORA, prefix_stage=first.report(stage))
        return trained, result

    def _train(self, artifact: ProgramArtifact, rows: Sequence[dict], options: TrainOptions,
               validation: Sequence[dict], progress: Callable[[int, int, float], None] | None,
               ) -> tuple[ProgramArtifact, TrainResult]:
        """``artifact`` trained on ``rows``, its own demonstration (if the prefix shows it)
        hidden from each row."""
        key = [(d["input"], d["output"]) for d in artifact.demos]
        if self.prog.program.recurrent:  # no key mask there: each row runs behind a prefix without it
            own = dict(zip(key, prefixes_without(self.prog.tokenizer, artifact.layout, self.spec, artifact.demos),
                           strict=True))
            hiding = {"own_prefixes": [own.get((r["input"], r["output"])) for r in rows]}
        else:
            spans = dict(zip(key, demo_spans(self.prog.tokenizer, artifact.layout, self.spec, artifact.demos),
                             strict=True))
            hiding = {"hidden_spans": [spans.get((r["input"], r["output"])) for r in rows]}
        result = train(self.prog, artifact, rows, options, validation=validation, progress=progress, **hiding)
        trained = replace(artifact, tuning=result.report(options), directory=None)
        if result.adapter is not None:
            trained.adapter = result.adapter
        if result.prefix is not None:
            trained.prefix = result.prefix
        return trained, result

    def _tuned_prefix(self, artifact: ProgramArtifact, rows: Sequence[dict], options: TrainOptions,
                      validation: Sequence[dict], progress: Callable[[int, int, float], None] | None,
                      ) -> tuple[ProgramArtifact, TrainResult]:
        """The few-shot prefix ``artifact`` of ``rows``, tuned; kept, so that the ``prefix``
        candidate and the first stage of ``prefix+lora`` train once per fold (training is
        deterministic: same rows, options and seed, same result)."""
        key = (tuple((r["input"], r["output"]) for r in rows),
               tuple((r["input"], r["output"]) for r in validation), repr(asdict(options)))
        if key not in self._tuned:
            self._tuned[key] = self._train(artifact, rows, options, validation, progress)
        elif progress is not None:
            result = self._tuned[key][1]
            progress(result.steps_run, options.steps, result.losses[-1] if result.losses else float("nan"))
        trained, result = self._tuned[key]
        return replace(trained), result

    def with_adapter(self, rows: Sequence[dict], adapter: LoraAdapter, options: TrainOptions,
                     tuning: dict) -> ProgramArtifact:
        """The few-shot program of ``rows`` running ``adapter`` (its prefix recomputed through
        the adapter when ``options.adapt_prefix``, as a ``.paw`` bundle's runtime runs it)."""
        from paw_mlx.programs.function import adapted

        artifact = self.prompted(rows)
        prefix = artifact.prefix
        if options.adapt_prefix:
            prefix = compute_prefix(adapted(self.prog, adapter), artifact.prefix_ids)
        return replace(artifact, prefix=prefix, adapter=adapter, tuning=dict(tuning, adapter=adapter.summary()),
                       directory=None)

    def outputs(self, artifact: ProgramArtifact, inputs: list[str], budget: int) -> list[str]:
        """The program's outputs for ``inputs``; an output that cannot meet the program's
        constraint within the budget counts as empty (wrong), not as a failed compile."""
        from paw_mlx.programs.function import ProgramFunction

        if artifact.returns is not None:
            budget = max(budget, artifact.generation.max_new_tokens)  # a grammar may need more to close
        function = ProgramFunction(artifact, self.prog, max_new_tokens=budget)
        try:
            return function(inputs)
        except ConstraintError:
            outputs = []
            for text in inputs:
                try:
                    outputs.append(function(text))
                except ConstraintError:
                    outputs.append("")
            return outputs


def _budget(prog: LoadedProgram, rows: Sequence[dict], limit: int) -> int:
    return min(limit, longest_output(prog, rows) + OUTPUT_MARGIN)  # what the scoring lets a candidate write


class Selection:
    """Cross-validation of the candidates on ``rows``, then the rebuild of one (or each) on all."""

    def __init__(self, prog: LoadedProgram, builder: Builder, rows: Sequence[dict], options: SelectOptions,
                 progress: Progress | None = None):
        options.check()
        if len(rows) < 2:
            raise PawError("choosing a program needs at least 2 examples (one to hold out)")
        self.prog, self.builder, self.rows, self.options = prog, builder, list(rows), options
        self.partitions = partitions(len(self.rows), options.folds, options.repeats, options.seed)
        self.folds = [fold for partition in self.partitions for fold in partition]
        self.budget = _budget(prog, self.rows, builder.generation.max_new_tokens)
        self.scores: dict[str, CandidateScore] = {}
        self._progress = progress
        k = len(self.folds)
        self.total = sum((k + 1) * self._steps(c) for c in options.candidates)
        self.done = 0

    def _steps(self, name: str) -> int:
        """Progress units of one fit of ``name``: its training steps (1 for an untrained one)."""
        training = self.options.training(name)
        if training is None:
            return 1
        if name == PREFIX_LORA and "prefix" not in self.options.candidates:  # else its first stage is prefix's
            return training.steps + self.options.prefix.steps
        return training.steps

    def _report(self, text: str, extra: int = 0) -> None:
        if self._progress is not None:
            self._progress(text, min(self.total, self.done + extra), self.total)

    def cross_validate(self) -> dict[str, CandidateScore]:
        """Score every candidate: each example predicted by a program fitted without it."""
        rows, k = self.rows, len(self.folds)
        for name in self.options.candidates:
            score = self.scores[name] = CandidateScore(name, outputs=[""] * len(rows))
            training = self.options.training(name)
            started = time.perf_counter()
            groups = [list(range(len(rows)))] if name == "spec" else self.folds  # the spec alone fits nothing
            for f, held in enumerate(groups):
                fold_started = time.perf_counter()
                fit = [rows[i] for i in range(len(rows)) if i not in held] if name != "spec" else []
                validation = [rows[i] for i in held]
                label = f"{name}: fold {f + 1}/{len(groups)}"
                self._report(label)

                def step_report(step: int, steps: int, loss: float, label: str = label) -> None:
                    self._report(f"{label}, step {step}/{steps}, loss {loss:.3f}", step)

                artifact, result = self.builder.build(name, fit, training, validation=validation,
                                                      progress=step_report, stage=self.options.prefix)
                outputs = self.builder.outputs(artifact, [r["input"] for r in validation], self.budget)
                for i, output in zip(held, outputs, strict=True):
                    if f < len(self.partitions[0]):  # the report keeps the first partition's
                        score.outputs[i] = output
                    score.correct += exact(output, rows[i]["output"])
                    score.total += 1
                if result is not None:
                    score.best_steps.append(result.best_step)
                if name in BAGGED and artifact.adapter is not None:
                    score.adapters.append(artifact.adapter)
                if artifact.tuning is not None and "prefix_stage" in artifact.tuning:
                    score.stage_steps.append(artifact.tuning["prefix_stage"]["best_step"])
                score.fold_seconds.append(round(time.perf_counter() - fold_started, 1))
                self.done += self._steps(name) if training else (k + 1) // len(groups)
            score.seconds = round(time.perf_counter() - started, 1)
        return self.scores

    @property
    def kept(self) -> str:
        """The candidate with the highest held-out exact match (ties: a bagged LoRA, then ``PREFERENCE``)."""
        return max(self.scores, key=lambda c: (self.scores[c].rate, self.bagged(c), -PREFERENCE.index(c)))

    def final_training(self, name: str) -> TrainOptions | None:
        """Training options for the rebuild: the folds' mean best step count (a bagged
        candidate is not trained again: the options its folds trained with)."""
        training = self.options.training(name)
        if training is None or self.bagged(name):
            return training
        return _with_mean_steps(training, self.scores[name].best_steps if name in self.scores else [])

    def final_stage(self, name: str) -> TrainOptions | None:
        """``prefix+lora``: the options of its prefix stage for the rebuild (the folds' mean best step)."""
        if name != PREFIX_LORA:
            return None
        return _with_mean_steps(self.options.prefix, self.scores[name].stage_steps if name in self.scores else [])

    def bagged(self, name: str) -> bool:
        """Whether the kept ``name`` is the mean of its folds' adapters (not trained again)."""
        return name in BAGGED and name in self.scores and bool(self.scores[name].adapters)

    def rebuild(self, name: str) -> ProgramArtifact:
        """Candidate ``name`` fitted on every example, with its training report."""
        started = time.perf_counter()
        if self.bagged(name):
            score = self.scores[name]
            training = self.options.training(name)
            artifact = self.builder.with_adapter(self.rows, mean_adapter(score.adapters), training,
                                                 {"method": name, "options": asdict(training),
                                                  "rebuild": _rebuild_text(name, self),
                                                  "fold_best_steps": score.best_steps})
        else:
            def step_report(step: int, steps: int, loss: float) -> None:
                self._report(f"{name}: all examples, step {step}/{steps}, loss {loss:.3f}", step)

            artifact, _ = self.builder.build(name, self.rows, self.final_training(name), progress=step_report,
                                             stage=self.final_stage(name))
        if name in self.scores:
            self.scores[name].seconds = round(self.scores[name].seconds + time.perf_counter() - started, 1)
        return replace(artifact, directory=None)

    @property
    def method(self) -> str:
        folds = f"{len(self.partitions[0])}-fold cross-validation"
        if len(self.partitions) > 1:
            folds = f"{folds} repeated over {len(self.partitions)} shuffles ({len(self.folds)} folds)"
        return f"{folds} over the {len(self.rows)} examples"

    def report(self) -> dict:
        kept = self.kept
        return {
            "method": self.method,
            "folds": [[self.rows[i]["input"] for i in held] for held in self.folds],
            "candidates": [{"name": s.name, "exact_match": round(s.exact_match, 4), "correct": s.correct,
                            "total": s.total, "seconds": s.seconds, "fold_seconds": s.fold_seconds,
                            "best_steps": s.best_steps, "stage_steps": s.stage_steps, "outputs": s.outputs}
                           for s in self.scores.values()],
            "kept": kept,
            "reason": _reason(kept, self.scores),
            "training": asdict(t) if (t := self.final_training(kept)) is not None else None,
            "rebuild": _rebuild_text(kept, self),
            "prefix_stage": asdict(t) if (t := self.final_stage(kept)) is not None else None,
        }


def select(prog: LoadedProgram, builder: Builder, rows: Sequence[dict], options: SelectOptions,
           progress: Progress | None = None) -> tuple[ProgramArtifact, dict]:
    """The kept program, rebuilt on all ``rows``, and the report of how it was chosen."""
    rows = list(rows)
    if len(rows) < 2:  # nothing to hold out: the examples serve as demonstrations
        options.check()
        info = {"method": "none: fewer than 2 examples", "kept": "fewshot", "candidates": [],
                "reason": "with one example there is nothing to hold out; it is shown as a demonstration"}
        return replace(builder.prompted(rows), selection=info), info
    selection = Selection(prog, builder, rows, options, progress)
    selection.cross_validate()
    artifact = selection.rebuild(selection.kept)
    selection._report("done", selection.total)
    info = selection.report()
    info["demonstrations"] = {"shown": len(artifact.demos), "examples": len(rows)}
    return replace(artifact, selection=info), info


def _with_mean_steps(options: TrainOptions, best_steps: list[int]) -> TrainOptions:
    """``options`` for a rebuild on all examples: the folds' mean best step count (at least 1)."""
    if not best_steps:
        return options
    return replace(options, steps=max(1, round(sum(best_steps) / len(best_steps))))


def _rebuild_text(name: str, selection: Selection) -> str:
    """How the kept program was built from all the examples, in words."""
    if selection.bagged(name):
        adapters = selection.scores[name].adapters
        text = f"the few-shot prefix with the mean of the {len(adapters)} folds' adapters"
        if sum(a.rank for a in adapters) > MAX_MEAN_RANK:
            text += f" (truncated to rank {MAX_MEAN_RANK})"
        return text
    if selection.options.training(name) is not None:
        return "trained again on all examples for the folds' mean best step count"
    return "the spec alone" if name == "spec" else "the spec with the examples as demonstrations"


def _reason(kept: str, scores: dict[str, CandidateScore]) -> str:
    best = scores[kept]
    others = [s for s in scores.values() if s.name != kept]
    text = f"{kept} has the most held-out exact matches ({best.correct}/{best.total})"
    ties = [s.name for s in others if s.rate == best.rate]
    if ties and best.adapters and kept in BAGGED:
        text += (f"; tied with {', '.join(ties)}, the LoRA is kept: it is the mean of the folds' adapters, "
                 "which scores above each fold's adapter alone")
    elif ties:
        text += f"; tied with {', '.join(ties)}, the simpler candidate is kept"
    elif others:
        runner = max(others, key=lambda s: s.rate)
        text += f"; next best {runner.name} ({runner.correct}/{runner.total})"
    return text
