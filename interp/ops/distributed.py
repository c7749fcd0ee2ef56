"""Collective ops that tensor-parallel programs hold (inserted by ``interp/distributed/sharding.py``)."""

from __future__ import annotations

import mlx.core as mx

from interp.ops.registry import implementation


@implementation("all_sum")
def all_sum(x):
    return mx.distributed.all_sum(x)
