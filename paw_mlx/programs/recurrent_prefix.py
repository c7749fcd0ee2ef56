"""A compiled program's prefix on a base with recurrent state: the whole cache list after it.

An artifact keeps its prefix as each attention layer's keys and values
(``prefix.safetensors``). A base with recurrent state (``interp/recurrent.py``: LFM2's conv
states, or any state kind with ``state``, ``trim``, ``copy`` and ``nbytes``) also needs each
recurrent layer's state after the prefix, which no file holds and no KV prefix implies. An
untrained prefix (the ``spec`` and ``fewshot`` candidates) is the base's own run over the
prefix ids, so that run, done once, gives every state exactly. A LoRA program's prefix is
the run of the model its adapter was trained behind (``adapter_on_prefix``): the base's,
or the adapted base's with ``adapt_prefix`` and for a ``.paw`` bundle, as on a KV base.
Its keys and values are held to the stored ones: a prefix tuned by training (or made by
another model) cannot be rebuilt so, and is refused rather than run wrong. Each call or
request starts from a ``copy()`` of every state and never writes into the kept one, so no
call sees another's input.
"""

from __future__ import annotations

import mlx.core as mx

from interp.errors import ArtifactError
from paw_mlx.runtime import LoadedProgram

#: how far a rebuilt prefix's keys and values may be from the stored ones (the same run, maybe
#: once through the compiled step: float rounding only; a tuned prefix is far beyond it)
REBUILD_TOLERANCE = 1e-3


def adapter_on_prefix(artifact) -> bool:
    """Whether a program's adapter applies to its prefix too: as it was trained (its tuning's
    ``adapt_prefix``); with no training record (a ``.paw`` bundle), yes, as llama.cpp runs one."""
    options = (artifact.tuning or {}).get("options") or {}
    return bool(options.get("adapt_prefix", True))


class RecurrentPrefix:
    """A program's prefix run once through ``prog`` (the base, or with ``adapter_on_prefix`` the
    base with the program's adapter), kept as the whole cache list; ``cache()`` hands out a copy
    for one row."""

    def __init__(self, prog: LoadedProgram, artifact):
        self.prog = prog
        self.artifact = artifact  # paw_mlx.programs.ProgramArtifact
        self.length = artifact.prefix_length
        self._states: list | None = None

    def build(self) -> RecurrentPrefix:
        """Run the prefix (once; evaluated, so any thread may copy it); ArtifactError if its keys and
        values are not the stored prefix's."""
        if self._states is not None:
            return self
        states = self.prog.make_cache()
        ids = mx.array([self.artifact.prefix_ids], dtype=mx.int32)
        with self.prog.lock:
            self.prog.model(ids, cache=states)
            mx.eval([s.state for s in states])
        kv = [states[i].state for i in range(self.prog.program.num_layers)]
        if len(kv) != len(self.artifact.prefix) or not all(
                mx.allclose(k, want_k, rtol=REBUILD_TOLERANCE, atol=REBUILD_TOLERANCE).item()
                and mx.allclose(v, want_v, rtol=REBUILD_TOLERANCE, atol=REBUILD_TOLERANCE).item()
                for (k, v), (want_k, want_v) in zip(kv, self.artifact.prefix, strict=False)):
            where = f"program {self.artifact.directory}" if self.artifact.directory else "this program"
            raise ArtifactError(f"{where} has a prefix that is not its base model's own run over the prefix ids "
                                "(tuned by training?); on a base with recurrent state only such a prefix runs, "
                                "since the recurrent layers' state after it is not stored: compile it with "
                                "--candidates spec,fewshot,lora")
        self._states = states
        return self

    def cache(self) -> list:
        """A fresh cache list at the end of the prefix, ready for one row (copies: never written back)."""
        return [state.copy() for state in self.build()._states]


def program_prefix(base: LoadedProgram, artifact, runner: LoadedProgram | None = None) -> RecurrentPrefix:
    """The ``RecurrentPrefix`` of ``artifact`` on ``base``: run by the base, or by ``runner`` (the
    base with the program's adapter; made here when not given) where ``adapter_on_prefix``."""
    if artifact.adapter is None or not adapter_on_prefix(artifact):
        return RecurrentPrefix(base, artifact)
    if runner is None:
        from paw_mlx.programs.function import adapted  # function.py imports this module

        runner = adapted(base, artifact.adapter)
    return RecurrentPrefix(runner, artifact)
