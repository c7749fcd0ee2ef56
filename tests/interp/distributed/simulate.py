"""Pipeline and tensor parallelism simulated in one process: the plans checked without launching ranks.

``pipeline_logits`` runs each stage's program in turn, handing on the tensors the plan
routes; ``tensor_logits`` runs every rank's program node by node in lockstep and makes
each ``all_sum`` node the sum over the ranks. Both take the calls ``whole_logits`` made
on the whole program (a prompt, then its greedy tokens one at a time through the KV
cache) and return the logits of each call.
"""

from __future__ import annotations

import mlx.core as mx

from interp.distributed.sharding import plan_tensor_parallel
from interp.distributed.stages import plan_pipeline, stage_program
from interp.graph import GraphModel, RunContext
from interp.program import Program, load_consts, read_program


def read_whole(path) -> tuple[Program, dict]:
    """A program and all its consts (lazily loaded, from one file or shards)."""
    program = read_program(path)
    return program, load_consts(program)


def _positions(tokens: mx.array, offset: int) -> mx.array:
    return mx.broadcast_to(mx.arange(offset, offset + tokens.shape[1], dtype=mx.int32), tokens.shape)


def whole_logits(program: Program, consts: dict, prompt: list[int], steps: int) -> tuple[list, list]:
    """(logits, feeds): the whole program on ``prompt``, then ``steps`` greedy tokens; feeds are its inputs."""
    model = GraphModel(program, consts)
    cache = model.make_cache()
    feeds, logits = [mx.array([prompt], dtype=mx.int32)], []
    for _ in range(steps + 1):
        out = model(feeds[-1], cache=cache)
        mx.eval(out)
        logits.append(out)
        feeds.append(mx.argmax(out[:, -1:, :], axis=-1).astype(mx.int32))
    return logits, feeds[:-1]


def pipeline_logits(program: Program, consts: dict, ranks: int, feeds: list[mx.array]) -> list[mx.array]:
    plan = plan_pipeline(program, ranks)
    stages = plan.stages
    models = [GraphModel(stage_program(program, stage, final=stage is stages[-1]),
                         {name: consts[name] for name in stage.consts}) for stage in stages]
    caches = [model.make_cache() or None for model in models]

    def call(tokens: mx.array, offset: int) -> mx.array:
        inputs = {"input_ids": tokens, "position_ids": _positions(tokens, offset)}
        carried: dict = {}
        kept: dict = {}
        for stage, model, cache in zip(stages, models, caches, strict=True):
            feed = dict(inputs)
            feed.update({name: carried[name] for name in stage.receives})
            feed.update({name: kept[name] for name in stage.local})
            outs = model.forward(feed, cache, offset)
            carried = {name: outs[name] for name in stage.sends}
            kept.update({name: outs[name] for name in stage.keeps})
        return outs["logits"]

    return _drive(call, feeds)


def tensor_logits(program: Program, consts: dict, ranks: int, feeds: list[mx.array]) -> list[mx.array]:
    plan = plan_tensor_parallel(program, ranks)
    models = [GraphModel(plan.rank_program(rank), {name: plan.cut_const(name, array, rank)
                                                   for name, array in consts.items()}, compile_decode=False)
              for rank in range(ranks)]
    caches = [model.make_cache() for model in models]

    def call(tokens: mx.array, offset: int) -> mx.array:
        inputs = {"input_ids": tokens, "position_ids": _positions(tokens, offset)}
        envs = [dict(model.consts, **inputs) for model in models]
        contexts = [RunContext(cache=cache, offset=offset) for cache in caches]
        for index, node in enumerate(models[0].program.nodes):
            if node.op == "all_sum":
                total = sum(env[node.inputs[0]] for env in envs)
                for env in envs:
                    env[node.outputs[0]] = total
                continue
            for model, env, ctx in zip(models, envs, contexts, strict=True):
                model._node_runners[index](env, ctx)
        return envs[0]["logits"]

    return _drive(call, feeds)


def _drive(call, feeds: list[mx.array]) -> list[mx.array]:
    offset, out = 0, []
    for tokens in feeds:
        logits = call(tokens, offset)
        mx.eval(logits)
        out.append(logits)
        offset += tokens.shape[1]
    return out


def max_difference(a: list[mx.array], b: list[mx.array]) -> float:
    return max(float(mx.abs(x - y).max()) for x, y in zip(a, b, strict=True))
