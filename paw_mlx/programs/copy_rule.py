"""The copy rule: when every example's output is made of words of its input, a program's
outputs are held to words of their input too.

Extraction and rewriting tasks (an email's domain, the numbers in a sentence, a list's
items, the words of a phrase in another order or case) answer with words they copy from
the input, and a small base model copies badly: ``hoo.com`` for ``ann@yahoo.com``,
``Karla`` for ``Karl``, ``55`` where the input says ``15``, ``BRIDGEMBUS`` for ``bridge``.
When all the training examples copy, the compiler infers the rule (``infer_copy_rule``)
and every call enforces it token by token (``CopyRule.regex``, an llguidance regular
expression built from the call's own input): each run of letters and each run of digits
in the output must be one of the input's (ignoring case when the examples change case),
or one of the few words most examples' outputs share (``name`` and ``age`` in
``{"name": "Ann", "age": 41}``). Everything else (spaces, punctuation, other scripts) is
free, and so is the order. The rule is inferred per fold in cross-validation, so the
held-out scores a program is chosen by are scores with it. See docs/programs.md.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from interp.errors import ArtifactError

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


@dataclass(frozen=True)
class CopyRule:
    """Outputs are made of the input's runs (``runs``) and ``shared`` ones."""

    #: whether a run matches an input run in any case (the examples change case: ``bridge`` ->
    #: ``BRIDGE``); the output may then use any case of it
    ignore_case: bool = False
    #: runs allowed in every output: those most training outputs hold without their input
    #: holding them (the keys of a JSON answer), sorted
    shared: tuple[str, ...] = ()

    def metadata(self) -> dict:
        return {"ignore_case": self.ignore_case, "shared": list(self.shared)}

    @classmethod
    def from_metadata(cls, meta: object, where: str) -> CopyRule:
        """The rule ``metadata`` wrote; an ``ArtifactError`` naming ``where`` if it is malformed."""
        if (not isinstance(meta, dict) or set(meta) != {"ignore_case", "shared"}
                or not isinstance(meta["ignore_case"], bool) or not isinstance(meta["shared"], list)
                or not all(isinstance(r, str) and RUN.fullmatch(r) for r in meta["shared"])):
            raise ArtifactError(f"{where}: 'copy_rule' must be {{\"ignore_case\": bool, \"shared\": [letter or "
                                "digit runs]}")
        return cls(meta["ignore_case"], tuple(meta["shared"]))

    def _key(self, run: str) -> str:
        return run.lower() if self.ignore_case else run

    def allows(self, input_text: str, output: str) -> bool:
        """Whether ``output`` keeps the rule for ``input_text``."""
        allowed = {self._key(r) for r in runs(input_text)} | {self._key(r) for r in self.shared}
        return all(self._key(r) in allowed for r in runs(output))

    def regex(self, input_text: str) -> str | None:
        """The regular expression a call's output on ``input_text`` must match, or None when the
        input has too many distinct runs to constrain (``MAX_INPUT_RUNS``)."""
        allowed = {self._key(r): r for r in (*runs(input_text), *self.shared)}
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
        if not self.ignore_case:
            return word
        return "".join(f"[{c.lower()}{c.upper()}]" for c in word)


def infer_copy_rule(rows: Sequence[dict]) -> CopyRule | None:
    """The copy rule the examples ``rows`` (``{"input", "output"}``) keep, or None.

    It holds when every output's runs are its input's, or among a few *shared* runs: those
    at least half of the outputs hold (and at least two) without their inputs holding them;
    and at least half of the outputs copy a run from their input (a task that answers with
    labels alone is left to ``returns``). Exact case is tried first, then any case. Fewer
    than ``MIN_EXAMPLES`` examples give no rule.
    """
    if len(rows) < MIN_EXAMPLES:
        return None
    for ignore_case in (False, True):
        key = str.lower if ignore_case else str
        novel: list[set[str]] = []
        copying = 0
        for row in rows:
            given = {key(r) for r in runs(row["input"])}
            said = [key(r) for r in runs(row["output"])]
            novel.append({r for r in said if r not in given})
            copying += any(r in given for r in said)
        counts = Counter(r for new in novel for r in new)
        shared = {r for r, count in counts.items() if count >= 2 and 2 * count >= len(rows)}
        if copying * 2 >= len(rows) and all(new <= shared for new in novel):
            return CopyRule(ignore_case, tuple(sorted(shared)))
    return None
