"""A compiled program as a Python callable: ``f = function(dir); f("input") -> str``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from interp.errors import ArtifactError, PawError
from paw_mlx.constrain import grammar_for
from paw_mlx.programs.artifact import ProgramArtifact, read_artifact
from paw_mlx.programs.batch import generate_batch
from paw_mlx.programs.compile import DEFAULT_BASE, compile, input_ids
from paw_mlx.programs.interpreter import interpreter
from paw_mlx.runtime import LoadedProgram


class ProgramFunction:
    """Calls a program: a string in, a string out; a list in, a list out (one batch).

    With an output constraint (``returns``, or the program's own), every output parses:
    it is one of the choices, matches the regex or is JSON valid for the schema.
    """

    def __init__(self, artifact: ProgramArtifact, base: LoadedProgram, max_new_tokens: int | None = None,
                 returns: Any = None):
        if artifact.base_fingerprint and artifact.base_fingerprint != base.fingerprint:
            raise ArtifactError(
                f"this program was compiled for base model {artifact.base_fingerprint} "
                f"({artifact.base_hint or 'unknown path'}), not for {base.fingerprint} ({base.path}); "
                "recompile it with `paw compile` for this base")
        if len(artifact.prefix) != base.model.num_layers:
            raise ArtifactError(f"the program has {len(artifact.prefix)} layers, the base model "
                                f"{base.model.num_layers}")
        self.artifact = artifact
        self.base = base
        self.max_new_tokens = max_new_tokens or artifact.generation.max_new_tokens
        returns = returns if returns is not None else artifact.returns
        self.grammar = None
        if returns is not None:
            self.grammar = grammar_for(base, returns)

    @property
    def spec(self) -> str:
        return self.artifact.spec

    def token_ids(self, text: str) -> list[int]:
        """The ids a call feeds after the prefix."""
        return input_ids(self.base.tokenizer, self.artifact.layout, text)

    def call_ids(self, rows: list[list[int]]) -> list[list[int]]:
        constraints = [self.grammar.start() for _ in rows] if self.grammar is not None else None
        return generate_batch(self.base, self.artifact.prefix, rows, max_new_tokens=self.max_new_tokens,
                              temperature=self.artifact.generation.temperature, constraints=constraints)

    def __call__(self, x: str | list[str]) -> str | list[str]:
        single = isinstance(x, str)
        inputs = [x] if single else list(x)
        if not all(isinstance(i, str) for i in inputs):
            raise PawError("a program takes a string or a list of strings")
        if not inputs:
            return []
        outs = self.call_ids([self.token_ids(i) for i in inputs])
        texts = [self.base.tokenizer.decode(o, skip_special_tokens=True) for o in outs]
        return texts[0] if single else texts


def _base_for(artifact: ProgramArtifact, base: str | Path | None) -> LoadedProgram:
    if base is not None:
        return interpreter(base)
    if artifact.base_hint and (Path(artifact.base_hint) / "prog.json").is_file():
        return interpreter(artifact.base_hint)
    return interpreter(DEFAULT_BASE)


def function(program: str | Path | ProgramArtifact, base: str | Path | None = None,
             max_new_tokens: int | None = None, returns: Any = None) -> ProgramFunction:
    """A callable for a compiled program directory, an in-memory artifact, or a .txt spec.

    The base model is ``base`` if given, else the one the program was compiled on (its
    recorded path), else the default 'smollm2'; a mismatch of fingerprints is an error.
    ``returns`` constrains outputs (a list of choices, ``{"regex": ...}``,
    ``{"json_schema": ...}``, ``{"json_object": True}``; see ``paw_mlx.constrain``),
    replacing the program's own constraint.
    """
    if isinstance(program, ProgramArtifact):
        artifact = program
    else:
        path = Path(program)
        if path.suffix == ".txt" and path.is_file():
            artifact = compile("@" + str(path), base=base if base is not None else DEFAULT_BASE)
        elif not path.exists():
            raise ArtifactError(f"no such program: {path}")
        else:
            artifact = read_artifact(path)
    return ProgramFunction(artifact, _base_for(artifact, base), max_new_tokens, returns)
