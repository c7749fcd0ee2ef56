"""Which examples a few-shot prefix shows: all of them up to a budget, then a spread.

With the 5-8 examples a program usually has, every one is a demonstration. A user may
give hundreds, and as demonstrations they would not fit: SmolLM2's 8,192-token context
holds about 600 short ones, and every fold of the cross-validation and every training
step reads the prefix. So a prefix shows at most ``MAX_DEMOS`` examples in at most a
quarter of the base model's context (``MAX_PREFIX_SHARE``, capped at ``MAX_DEMO_TOKENS``);
the examples beyond it still train the tuned candidates and are scored as held-out rows.

The shown examples are a spread, not the file's first lines (files are often sorted, by
label or by length): a seeded shuffle, then one example of each distinct output in turn
(round robin), so a classification task's prefix shows every label it can before it
shows any twice.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

#: the most examples one prefix shows as demonstrations
MAX_DEMOS = 32
#: the most of the base model's context the demonstrations may take ...
MAX_PREFIX_SHARE = 4
#: ... and never more tokens than this, whatever the context
MAX_DEMO_TOKENS = 2048


def demo_budget(context_length: int) -> int:
    """Tokens the demonstrations of one prefix may take on a base model of ``context_length``."""
    return max(1, min(MAX_DEMO_TOKENS, context_length // MAX_PREFIX_SHARE))


def choose_demos(rows: Sequence[dict], cost: Callable[[dict], int], budget: int, limit: int = MAX_DEMOS,
                 seed: int = 0) -> list[dict]:
    """The rows a prefix shows: all of ``rows`` when they fit ``limit`` and ``budget`` (tokens,
    ``cost(row)`` each), else a spread of them (see the module) in their original order."""
    rows = list(rows)
    if len(rows) <= limit and sum(cost(r) for r in rows) <= budget:
        return rows
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    by_output: dict[str, list[int]] = {}
    for i in order:
        by_output.setdefault(rows[i]["output"], []).append(i)
    spread: list[int] = []
    queues = list(by_output.values())
    while queues:
        spread += [q.pop(0) for q in queues]
        queues = [q for q in queues if q]
    chosen, used = [], 0
    for i in spread:
        if len(chosen) == limit:
            break
        need = cost(rows[i])
        if used + need <= budget:
            chosen.append(i)
            used += need
    return [rows[i] for i in sorted(chosen)]
