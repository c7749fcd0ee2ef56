"""The copy rule: when every example's output is made of words of its input, a program's
outputs are held to words of their input too.

Extraction and rewriting tasks (an email's domain, the numbers in a sentence, a list's
items, the words of a phrase in another order or case) answer with words they copy from
the input, and a small base model copies badly: ``hoo.com`` for ``ann@yahoo.com``,
``Karla`` for ``Karl``, ``55`` where the input says ``15``, ``BRIDGEMBUS`` for ``bridge``.
When all the training examples copy, the compiler infers the rule (``infer_copy_rule``)
and every call enforces it token by token (``CopyRule.regex``, an llguidance regular
expression built from the call's own input): each run of letters and each run of digits
in the output must be one of the input's (in the case the examples' outputs use, when they
change case), or one of the few words most examples' outputs share (``name`` and ``age``
in ``{"name": "Ann", "age": 41}``). Everything else (spaces, punctuation, other scripts) is
free, and so is the order. The rule is inferred per fold in cross-validation, so the
held-out scores a program is chosen by are scores with it. See docs/programs.md.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from interp.errors import ArtifactError, ConstraintError

#: the runs the rule is about: letters and digits, ASCII only, so that Python and the grammar
#: engine agree on every character (other characters are free, never constrained)
RUN = re.compile(r"[A-Za-z]+|[0-9]+")
#: the fewest examples a rule is inferred from
MIN_EXAMPLES = 4
#: an input with more distinct runs than this is not constrained (the grammar would be large
#: and the rule says little about such an input)
MAX_INPUT_RUNS = 2000
#: separators: anything that is not an ASCII letter or digit
_SEP = "[^A-Za-z0-9]"


def runs(text: str) -> list[str]:
    """The letter runs and digit runs of ``text``, in order (``"50th"`` -> ``["50", "th"]``)."""
    return RUN.findall(text)


#: how an output's runs may be cased: as the input's (exact), or any case of them (any), or
#: only in capitals (upper) or only in small letters (lower), when the examples change case
CASES = ("exact", "any", "upper", "lower")


@dataclass(frozen=True)
class CopyRule:
    """Outputs are made of the input's runs (``runs``) and ``shared`` ones, cased as ``case`` says."""

    #: one of ``CASES``: ``exact`` unless the examples change case (``bridge`` -> ``BRIDGE``: upper)
    case: str = "exact"
    #: runs allowed in every output: those most training outputs hold without their input
    #: holding them (the keys of a JSON answer), sorted (lowercased unless the case is exact)
    shared: tuple[str, ...] = ()

    def metadata(self) -> dict:
        return {"case": self.case, "shared": list(self.shared)}

    @classmethod
    def from_metadata(cls, meta: object, where: str) -> CopyRule:
        """The rule ``metadata`` wrote; an ``ArtifactError`` naming ``where`` if it is malformed."""
        if (not isinstance(meta, dict) or set(meta) != {"case", "shared"} or meta["case"] not in CASES
                or not isinstance(meta["shared"], list)
                or not all(isinstance(r, str) and RUN.fullmatch(r) for r in meta["shared"])):
            raise ArtifactError(f"{where}: 'copy_rule' must be {{\"case\": {' or '.join(CASES)}, \"shared\": "
                                "[letter or digit runs]}")
        return cls(meta["case"], tuple(meta["shared"]))

    def describe(self) -> str:
        """What the rule does to an output, in words (``paw compile`` and ``paw inspect`` say it)."""
        case = {"exact": "", "any": " in any case", "upper": " in capitals", "lower": " in small letters"}[self.case]
        shared = f" (and {', '.join(self.shared)})" if self.shared else ""
        return f"held to words of its own input{case}{shared}"

    def _key(self, run: str) -> str:
        return run if self.case == "exact" else run.lower()

    def _cased(self, run: str) -> bool:
        return (self.case != "upper" or run == run.upper()) and (self.case != "lower" or run == run.lower())

    def allows(self, input_text: str, output: str) -> bool:
        """Whether ``output`` keeps the rule for ``input_text``."""
        allowed = {self._key(r) for r in runs(input_text)} | {self._key(r) for r in self.shared}
        return all(self._key(r) in allowed and self._cased(r) for r in runs(output))

    def regex(self, input_text: str) -> str | None:
        """The regular expression a call's output on ``input_text`` must match, or None when the
        input has too many distinct runs to constrain (``MAX_INPUT_RUNS``)."""
        allowed = {self._key(r) for r in (*runs(input_text), *self.shared)}
        if len(allowed) > MAX_INPUT_RUNS:
            return None
        words = sorted(k for k in allowed if k[0].isalpha())
        numbers = sorted(k for k in allowed if k[0].isdigit())
        letters = "|".join(self._spelled(w) for w in words)
        digits = "|".join(numbers)
        # a chunk: runs with no separator between them, letters and digits in turn (each run
        # maximal, so ``yah`` can never stand for ``yahoo``); chunks are split by separators
        if letters and digits:
            chunk = f"(?:(?:{letters})(?:(?:{digits})(?:{letters}))*(?:{digits})?" \
                    f"|(?:{digits})(?:(?:{letters})(?:{digits}))*(?:{letters})?)"
        elif letters or digits:
            chunk = f"(?:{letters or digits})"
        else:
            return f"{_SEP}*"
        return f"{_SEP}*(?:{chunk}(?:{_SEP}+{chunk})*)?{_SEP}*"

    def _spelled(self, word: str) -> str:
        if self.case == "exact":
            return word
        if self.case == "upper":
            return word.upper()
        if self.case == "lower":
            return word
        return "".join(f"[{c}{c.upper()}]" for c in word)


def infer_copy_rule(rows: Sequence[dict]) -> CopyRule | None:
    """The copy rule the examples ``rows`` (``{"input", "output"}``) keep, or None.

    It holds when every output's runs are its input's, or among a few *shared* runs: those
    at least half of the outputs hold (and at least two) without their inputs holding them;
    and at least half of the outputs copy a run from their input (a task that answers with
    labels alone is left to ``returns``). Exact case is tried first, then any case; then, if
    every output's letters are capitals (small letters), outputs are held to capitals (small
    letters). Fewer than ``MIN_EXAMPLES`` examples give no rule.
    """
    if len(rows) < MIN_EXAMPLES:
        return None
    for exact in (True, False):
        key = str if exact else str.lower
        novel: list[set[str]] = []
        copying = 0
        for row in rows:
            given = {key(r) for r in runs(row["input"])}
            said = [key(r) for r in runs(row["output"])]
            novel.append({r for r in said if r not in given})
            copying += any(r in given for r in said)
        counts = Counter(r for new in novel for r in new)
        shared = tuple(sorted(r for r, count in counts.items() if count >= 2 and 2 * count >= len(rows)))
        if copying * 2 >= len(rows) and all(new <= set(shared) for new in novel):
            return CopyRule("exact" if exact else _case_of(rows), shared)
    return None


def _case_of(rows: Sequence[dict]) -> str:
    """``upper`` or ``lower`` when every output's letters are in that case, else ``any``."""
    letters = "".join(c for row in rows for c in row["output"] if c.isascii() and c.isalpha())
    if letters and letters == letters.upper():
        return "upper"
    if letters and letters == letters.lower():
        return "lower"
    return "any"


def copy_constraint(rule: CopyRule | None, prog, input_text: str, lead: str = ""):
    """A fresh constraint holding one output of ``prog`` (a loaded base) to ``rule`` for
    ``input_text``, after the program's output ``lead``; None with no rule, an input too large
    to constrain, or a grammar the engine will not build (the call then runs without it).
    Not ``required``: an output its budget cuts mid-word is returned, as without the rule."""
    regex = rule.regex(input_text) if rule is not None else None
    if regex is None:
        return None
    from paw_mlx.constrain import grammar_for

    try:
        return grammar_for(prog, {"regex": regex}, lead=lead, checked=False).start(required=False)
    except ConstraintError:
        return None
