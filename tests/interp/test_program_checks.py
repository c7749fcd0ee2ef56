"""Malformed programs are refused with one ProgramError: at load for what the files say,
at run time (naming the node) for what only the shapes show, before MLX can crash."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import mlx.core as mx
import pytest

import paw_mlx
from interp import limits, schema
from interp.errors import PawError, ProgramError, WeightsError
from interp.ops import REGISTRY
from interp.program import read_program


@pytest.fixture
def program_copy(tiny_program, tmp_path) -> Path:
    target = tmp_path / "prog"
    shutil.copytree(tiny_program, target)
    return target


def edit_spec(directory: Path, change) -> None:
    path = directory / "prog.json"
    spec = json.loads(path.read_text())
    change(spec)
    path.write_text(json.dumps(spec))


def node_index(spec: dict, op: str) -> int:
    return next(i for i, n in enumerate(spec["nodes"]) if n["op"] == op)


def set_attr(op: str, name: str, value):
    def change(spec):
        spec["nodes"][node_index(spec, op)]["attrs"][name] = value
    return change


@pytest.mark.parametrize("op, name, value, message", [
    ("split", "sizes", [-2**33, 64, 32], "must be >= 0"),  # aborted the process (SIGABRT)
    ("split", "sizes", [2**40, 32, 32], "must be <= 2147483647"),
    ("reshape", "shape", ["v2", "v1", -2, 16], "must be >= -1"),
    ("attention", "layer", 7, "not below state.kv_cache.layers"),
    ("attention", "window", -3, "must be >= 0"),
    ("split", "sizes", [64, 32, "nowhere"], "before it is defined"),
    ("split", "sizes", [64, 32, 3.5], r"must be of kind int\[\]"),
    ("rms_norm", "eps", "tiny", "must be of kind float"),
])
def test_attribute_outside_its_range_is_refused_at_load(program_copy, op, name, value, message):
    edit_spec(program_copy, set_attr(op, name, value))
    with pytest.raises(ProgramError, match=message):
        read_program(program_copy)


def test_full_larger_than_the_memory_budget_is_refused_at_load(program_copy, monkeypatch):
    # shape [2**30, 1, 1] segfaulted under a memory cap; now it is checked against the budget
    def add_full(spec):
        spec["nodes"].insert(0, {"op": "full", "inputs": [], "attrs": {"shape": [2**30, 1, 1], "value": 1.0,
                                                                         "dtype": "float32"}, "outputs": ["big"]})
    edit_spec(program_copy, add_full)
    monkeypatch.setenv("PAW_MEMORY_LIMIT", "1G")
    limits.reset_budget()
    try:
        with pytest.raises(ProgramError, match=r"needs 4\.3 GB, more than the 1\.1 GB"):
            read_program(program_copy)
    finally:
        monkeypatch.delenv("PAW_MEMORY_LIMIT")
        limits.reset_budget()


@pytest.mark.parametrize("given", ["inf", "1e999", "nan", "-1G", "0"])
def test_a_memory_limit_that_is_no_byte_count_is_one_error(monkeypatch, given):
    # "inf" and "1e999" read as float infinity, which int() refused with an OverflowError
    monkeypatch.setenv("PAW_MEMORY_LIMIT", given)
    limits.reset_budget()
    try:
        with pytest.raises(PawError, match="PAW_MEMORY_LIMIT must be a positive number of bytes"):
            limits.memory_budget()
    finally:
        monkeypatch.delenv("PAW_MEMORY_LIMIT")
        limits.reset_budget()


def _outside(arg: schema.Arg):
    if arg.choices:
        return "not-a-choice" if arg.kind == schema.STR else max(arg.choices) + 1
    if arg.nonzero:
        return 0
    return arg.low - 1 if arg.low is not None and arg.low > -2**31 else arg.high + 1


def test_every_range_in_the_schema_is_enforced():
    """Each bounded attribute refuses a value just outside its range and takes its default (the table is walked)."""
    bounded = [arg for spec in schema.OPS.values() for arg in spec.attrs
               if arg.low is not None or arg.high is not None or arg.choices or arg.nonzero]
    assert len(bounded) >= 20
    for arg in bounded:
        assert arg.range_problem(_outside(arg)), arg
        if not arg.required and arg.default is not None:
            assert arg.range_problem(arg.default) is None, arg


@pytest.mark.parametrize("change, message", [
    (lambda s: s.update(nodes={"op": "add"}), "'nodes' must be a JSON array"),
    (lambda s: s["nodes"].__setitem__(0, "add"), "node 0 must be an object"),
    (lambda s: s["nodes"][0].update(op=["add"]), "unknown op"),
    (lambda s: s["nodes"][3].update(inputs="v3"), "inputs and outputs must be arrays"),
    (lambda s: s["nodes"][3].update(outputs=[7]), "misnames output"),
    (lambda s: s.update(inputs=[{"name": "tokens", "dtype": "int32"}]), "not one the interpreter feeds"),
    (lambda s: s.update(inputs=[{"name": "input_ids", "dtype": "int32"}] * 2), "declared twice"),
    (lambda s: s.update(outputs=[{"name": "v3"}]), "no output named 'logits'"),
    (lambda s: s["outputs"][0].update(name=[]), r"program output \[\] is never computed"),
    (lambda s: s["consts"]["lm_head.weight"].update(shape=[384, -64]), "expected a list of sizes"),
    (lambda s: s["model"].update(context_length="long"), "context_length must be a positive integer"),
    (lambda s: s["model"].update(eos_token_ids=[2, -1]), "eos_token_ids must be a list of token ids"),
    (lambda s: s["model"].update(vocab_size=500), "the embedding of input_ids has only 384 rows"),
    (lambda s: s["model"].update(source="hub"), "source must be an object"),
    (lambda s: s.update(state={"kv_cache": {"layers": "two"}}), "state.kv_cache.layers"),
    (lambda s: s.update(state={"kv_cache": {"layers": 2}, "rwkv": {"layers": 1}}),
     r"state.rwkv is not a kind of state this paw keeps \(conv, delta, kv_cache, lru, ssm\)"),
    (lambda s: s.update(state={"kv_cache": {"layers": 2}, "conv": {"layers": -1}}), "state.conv.layers must be"),
    (lambda s: s.update(state={"kv_cache": {"layers": 2}, "delta": {"layers": "3"}}), "state.delta.layers must be"),
    (lambda s: s.update(state={"kv_cache": {"layers": 2}, "ssm": {"layers": "one"}}), "state.ssm.layers must be"),
    (lambda s: s.update(version=True), "format version True"),
])
def test_malformed_prog_json_is_one_program_error(program_copy, change, message):
    edit_spec(program_copy, change)
    with pytest.raises(ProgramError, match=message):
        read_program(program_copy)


def test_an_embedding_with_rows_beyond_the_vocabulary_loads(program_copy):
    """Llama 3.2 Vision's text model: 8 embedding rows for image tokens its head never writes.
    The program takes the declared vocabulary's ids, and an id past it is one input error."""
    import paw_mlx
    from interp.errors import InputError

    edit_spec(program_copy, lambda s: s["model"].update(vocab_size=300))
    assert read_program(program_copy).vocab_size == 300
    prog = paw_mlx.load(program_copy)
    assert len(list(paw_mlx.runtime.stream_tokens(prog, [5, 17, 299], max_tokens=3))) == 3
    with pytest.raises(InputError, match="299"):
        prog.check_ids([5, 350])
    penalized = paw_mlx.runtime.stream_tokens(prog, [5, 17, 299], max_tokens=3, repetition_penalty=1.3,
                                              presence_penalty=0.5, temperature=0.7, seed=1)
    assert all(0 <= t < 384 for t in penalized)


def test_deeply_nested_json_is_a_program_error(program_copy):
    (program_copy / "prog.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ProgramError, match="nested too deeply"):
        read_program(program_copy)


def rewrite_header(path: Path, change) -> None:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    change(header)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + length:])


@pytest.mark.parametrize("change, message", [
    (lambda h: h["lm_head.weight"].update(data_offsets=[0, 10**12]), "offsets hold"),
    (lambda h: h["lm_head.weight"].update(shape=[384, 65]), "offsets hold"),
    (lambda h: h["lm_head.weight"].update(dtype=["F32"]), "no dtype paw reads"),
    (lambda h: h["lm_head.weight"].update(data_offsets=[-4, 98300]), "malformed data_offsets"),
    (lambda h: h.update(__metadata__={"format": 1}), "__metadata__"),
    (lambda h: h["model.norm.weight"].update(data_offsets=h["lm_head.weight"]["data_offsets"][:1] * 2), "offsets hold"),
])
def test_safetensors_header_must_describe_its_file(program_copy, change, message):
    rewrite_header(program_copy / "consts.safetensors", change)
    with pytest.raises(WeightsError, match=message):
        read_program(program_copy)


def test_overlapping_tensors_are_refused(program_copy):
    def overlap(header):
        tensors = [h for name, h in header.items() if name != "__metadata__" and h["shape"] == [64]]
        first, second = sorted(tensors, key=lambda h: h["data_offsets"][0])[:2]
        second["data_offsets"] = [first["data_offsets"][0] + 4, first["data_offsets"][1] + 4]
    rewrite_header(program_copy / "consts.safetensors", overlap)
    with pytest.raises(WeightsError, match="overlap"):
        read_program(program_copy)


def test_vocabulary_is_the_embedding_rows(tiny_program):
    assert read_program(tiny_program).vocab_size == 384


# ----------------------------------------------------------------------------- run time


def run_op(op: str, *inputs, **attrs):
    return REGISTRY[op].fn(*inputs, **attrs)


def test_ops_refuse_what_mlx_would_crash_on():
    x = mx.zeros((4, 8))
    with pytest.raises(ProgramError, match="out of range"):
        run_op("select", x, dim=0, index=100)  # read past the array, exit 0
    with pytest.raises(ProgramError, match="do not add up"):
        run_op("split", x, sizes=[6, 20], dim=-1)
    with pytest.raises(ProgramError, match="outside"):
        run_op("full", shape=[2**20, 2**20, 2**20 + 2**31], value=0.0, dtype="float32")
    with pytest.raises(ProgramError, match="needs"):
        run_op("full", shape=[2**20, 2**20, 2**20], value=0.0, dtype="float32")  # segfaulted
    with pytest.raises(ProgramError, match="step must not be 0"):
        run_op("arange", start=0, end=10, step=0)
    with pytest.raises(ProgramError, match="needs"):
        run_op("expand", mx.zeros((1, 1)), shape=[2**30, 2**30])
    with pytest.raises(ProgramError, match="only one entry may be -1"):
        run_op("reshape", x, shape=[-1, -1])
    # out-of-range gathers are clipped to the axis: no read past the table (these segfaulted)
    table = mx.arange(12).reshape(4, 3)
    assert run_op("embedding", table, mx.array([[100_000_000]])).tolist() == [[[9, 10, 11]]]
    assert run_op("take", table, mx.array([2**32 - 1], dtype=mx.uint32), dim=0).tolist() == [[9, 10, 11]]
    assert run_op("gather", table, mx.array([[-100_000_000]]), dim=1).tolist() == [[0], [3], [6], [9]]
    assert run_op("slice", x, dim=1, start=-2**40, end=2**40, step=3).shape == (4, 3)


def test_run_time_failure_names_the_node(program_copy):
    def bad_reshape(spec):
        spec["nodes"][node_index(spec, "reshape")]["attrs"]["shape"] = ["v2", "v1", 3, 16]
    edit_spec(program_copy, bad_reshape)
    prog = paw_mlx.load(program_copy)
    with pytest.raises(ProgramError, match=r"node \d+ \(reshape\) failed: \[reshape\] Cannot reshape"):
        paw_mlx.generate(prog, [1, 2, 3], max_tokens=2)


def test_symbolic_attribute_out_of_range_at_run_time(program_copy):
    """A size computed from the input (sym_mul) is held to the schema's range when it is used."""
    def huge_split(spec):
        index = node_index(spec, "split")
        spec["nodes"].insert(index, {"op": "sym_mul", "inputs": ["v1", -2**33], "attrs": {}, "outputs": ["neg"]})
        spec["nodes"][index + 1]["attrs"]["sizes"] = ["neg", 32, 32]
    edit_spec(program_copy, huge_split)
    prog = paw_mlx.load(program_copy)
    with pytest.raises(ProgramError, match=r"\(split\): attribute 'sizes' came to -\d+ at run time; it must be >= 0"):
        paw_mlx.generate(prog, [1, 2], max_tokens=1)


def test_outputs_beyond_the_budget_stop_before_mlx_allocates(program_copy, monkeypatch):
    def blow_up(spec):
        index = node_index(spec, "rms_norm")
        spec["nodes"].insert(index, {"op": "tile", "inputs": ["v3"], "attrs": {"reps": [1, 64, 4096]},
                                     "outputs": ["wide"]})
    edit_spec(program_copy, blow_up)
    monkeypatch.setenv("PAW_MEMORY_LIMIT", "64M")
    limits.reset_budget()
    try:
        prog = paw_mlx.load(program_copy)
        with pytest.raises(ProgramError, match="tile"):
            paw_mlx.generate(prog, [1, 2, 3, 4], max_tokens=1)
    finally:
        monkeypatch.delenv("PAW_MEMORY_LIMIT")
        limits.reset_budget()


def test_an_attention_node_written_without_sinks_still_loads_and_runs(tiny_program, program_copy):
    """Programs exported before ``attention`` took its optional ``sinks`` and ``keep`` inputs have three; the
    reader fills in both as null."""
    from interp.graph import GraphModel

    def drop_sinks(spec):
        for node in spec["nodes"]:
            if node["op"] == "attention":
                assert node["inputs"][3] is None
                node["inputs"] = node["inputs"][:3]

    edit_spec(program_copy, drop_sinks)
    nodes = [n for n in read_program(program_copy).nodes if n.op == "attention"]
    assert nodes and all(n.inputs[3:] == (None, None) for n in nodes)
    tokens = mx.array([[1, 5, 9, 3]])
    old, new = (GraphModel.from_program(read_program(d))(tokens) for d in (program_copy, tiny_program))
    assert mx.array_equal(old, new)


def test_a_missing_required_input_is_still_refused(program_copy):
    def drop_value(spec):
        node = spec["nodes"][node_index(spec, "attention")]
        node["inputs"] = node["inputs"][:2]

    edit_spec(program_copy, drop_value)
    with pytest.raises(ProgramError, match="has 2 inputs; op 'attention' takes 5"):
        read_program(program_copy)


@pytest.mark.parametrize("program, op, layer, state, message", [
    ("hybrid_program", "causal_conv1d", 0, None, r"layer 0 is not a state.conv slot \(1 to 1 \+ state.conv.layers 3\)"),
    ("hybrid_program", "causal_conv1d", 4, None, "layer 4 is not a state.conv slot"),
    ("hybrid_program", "causal_conv1d", 1, {"kv_cache": {"layers": 1}}, r"state.conv.layers 0\)"),
    ("gated_delta_program", "gated_delta_rule", 3, None,
     r"layer 3 is not a state.delta slot \(4 to 4 \+ state.delta.layers 3\)"),
    ("gated_delta_program", "gated_delta_rule", 7, None, "layer 7 is not a state.delta slot"),
    ("gated_delta_program", "gated_delta_rule", 4, {"kv_cache": {"layers": 1}, "conv": {"layers": 3}},
     r"state.delta.layers 0\)"),
    # the tiny Mamba2: no KV cache, slots 0 and 1 conv, 2 and 3 SSM
    ("ssm_program", "ssm_scan", 1, None, r"layer 1 is not a state.ssm slot \(2 to 2 \+ state.ssm.layers 2\)"),
    ("ssm_program", "ssm_scan", 4, None, "layer 4 is not a state.ssm slot"),
    # the tiny RecurrentGemma: slot 0 its attention's KV cache, 1 and 2 conv, 3 and 4 LRU
    ("recurrent_gemma_program", "lru_scan", 2, None,
     r"layer 2 is not a state.lru slot \(3 to 3 \+ state.lru.layers 2\)"),
])
def test_a_stateful_node_must_name_a_slot_of_its_state(request, tmp_path, program, op, layer, state, message):
    """The cache list holds the KV caches, then the conv, delta, SSM and LRU states: a causal_conv1d node
    names a conv slot, a gated_delta_rule node a delta slot, an ssm_scan node an SSM slot, an lru_scan node
    an LRU slot."""
    target = tmp_path / "prog"
    shutil.copytree(request.getfixturevalue(program), target)

    def change(spec):
        spec["nodes"][node_index(spec, op)]["attrs"]["layer"] = layer
        if state is not None:
            spec["state"] = state
    edit_spec(target, change)
    with pytest.raises(ProgramError, match=message):
        read_program(target)
