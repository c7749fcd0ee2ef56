"""Mutational fuzzing of programs and compiled programs, each case run the way a user meets it.

A case copies a valid program (or compiled program), applies a few mutations to its files
(JSON fields, the safetensors header, raw bytes, the chat template), then runs ``paw`` on
it in a subprocess under a timeout and an address-space cap. The only acceptable
outcomes are a successful run (exit 0) or one ``paw: error:`` line with exit 1, after the
traceback of a ``PawError`` that ``PAW_DEBUG=1`` prints: never an unexpected exception
(``PAW_DEBUG=1`` re-raises it, with no ``paw: error:`` line), a signal (segfault, abort),
a hang or another exit code.

Mutations draw their choices from a ``Chooser``: ``HypothesisChooser`` in the test suite
(``tests/test_fuzz.py``, so hypothesis can shrink a failure), ``RandomChooser`` in the
long runs of ``scripts/fuzz.py``.
"""

from __future__ import annotations

import json
import random
import re
import resource
import shutil
import struct
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.child_env import child_env

ROOT = Path(__file__).resolve().parents[1]
#: address space a case may map (a paw run on the tiny program maps about 0.7 GB)
MEMORY_CAP = 4 << 30
#: seconds a case may run (a tiny program's run takes about one; a chat template may use two)
TIMEOUT = 60.0

OPS_FOR_SWAP = ["add", "mul", "reshape", "transpose", "split", "full", "arange", "slice", "select", "take",
                "gather", "expand", "tile", "repeat_interleave", "cat", "embedding", "linear", "matmul",
                "softmax", "rms_norm", "attention", "topk", "cast", "sym_size", "sym_mul", "cumsum",
                "quantized_linear", "ternary_linear", "layer_norm", "rope", "flip", "tril", "where", "sum"]
NASTY_NUMBERS = [-1, 0, 1, 2, 3, -2, 7, 16, 64, 255, 384, 1000, 2**16, 2**31 - 1, 2**31, -2**31, 2**32,
                 2**33, -2**33, 2**40, 2**62, 2**63, -2**63, 2**64, 10**30, 0.5, -0.0, 1e308, 1e-300]
NASTY_VALUES = [None, True, False, "", "v1", "input_ids", "position_ids", "logits", "float32", "int64", "bool",
                "x" * 200, [], {}, [None], [[[]]], [2**30, 1, 1], [-1, -1], [2**20, 2**20, 2**20], [0],
                {"a": 1}, float("nan"), float("inf"), -float("inf"), "\u0000", "../../etc/passwd"]
NASTY_TEMPLATES = [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{{ 'A' * 4000000000 }}",
    "{{ 2 ** 99999999 }}",
    "{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}",
    "{{ raise_exception('no') }}",
    "{{ messages[0].content.__class__.__mro__ }}",
    "{{ ''.__class__.__subclasses__() }}",
    "{% for %}",
    "{{ 'a'|center(999999999) }}",
    "{{ '%0999999999d' % 1 }}",
    "{{ '{:>999999999}'.format('a') }}",
    "{{ cycler }}{{ joiner }}{{ namespace }}",
    "{{ messages|tojson }}{{ 1/0 }}",
    "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "",
]


class Chooser:
    """Where a mutation's choices come from."""

    def below(self, n: int) -> int:
        raise NotImplementedError

    def pick(self, items: Sequence):
        return items[self.below(len(items))]

    def chance(self, percent: int) -> bool:
        return self.below(100) < percent

    def integer(self) -> int:
        raise NotImplementedError


class RandomChooser(Chooser):
    def __init__(self, seed: int):
        self._rng = random.Random(seed)

    def below(self, n: int) -> int:
        return self._rng.randrange(n)

    def integer(self) -> int:
        return self._rng.choice([self._rng.randint(-300, 300), self._rng.randint(-2**40, 2**40)])


class HypothesisChooser(Chooser):
    def __init__(self, data):
        from hypothesis import strategies as st

        self._data, self._st = data, st

    def below(self, n: int) -> int:
        return self._data.draw(self._st.integers(0, n - 1))

    def integer(self) -> int:
        return self._data.draw(self._st.integers(-2**40, 2**40))


def nasty_value(chooser: Chooser, current=None):
    """A value to put where ``current`` was: a perturbation of it, or something hostile."""
    roll = chooser.below(10)
    if roll < 3 and isinstance(current, (int, float)) and not isinstance(current, bool):
        return chooser.pick([current + 1, current - 1, -current, current * 1000, current * 2**20, 0, -1])
    if roll < 5:
        return chooser.pick(NASTY_NUMBERS)
    if roll < 6:
        return chooser.integer()
    if roll < 7 and isinstance(current, list) and current:
        return [nasty_value(chooser, item) for item in current]
    return chooser.pick(NASTY_VALUES)


# ----------------------------------------------------------------------------- JSON mutations


def _containers(tree, chooser: Chooser, focus: list) -> tuple[object, object]:
    """(container, key) of a node in ``tree``, walking from the path prefix ``focus`` at random."""
    node, key, parent = tree, None, None
    for step in focus:
        if isinstance(node, dict) and step in node:
            parent, key, node = node, step, node[step]
        elif isinstance(node, list) and node and step == "*":
            index = chooser.below(len(node))
            parent, key, node = node, index, node[index]
        else:
            break
    while isinstance(node, (dict, list)) and node and (parent is None or chooser.chance(60)):
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        step = chooser.pick(keys)
        parent, key, node = node, step, node[step]
    return parent, key


PROGRAM_FOCUS = [(45, ["nodes", "*", "attrs"]), (15, ["nodes", "*", "inputs"]), (5, ["nodes", "*"]),
                 (10, ["consts", None]), (10, ["model"]), (5, ["inputs"]), (5, ["outputs"]), (5, ["state"])]


def _focus(chooser: Chooser, table) -> list:
    roll, total = chooser.below(100), 0
    for weight, path in table:
        total += weight
        if roll < total:
            return path
    return []


def _values_before(tree: dict, index: int) -> list[str]:
    """Names of the values defined before node ``index`` (inputs, consts, earlier outputs)."""
    inputs, consts = tree.get("inputs"), tree.get("consts")
    names = [i.get("name") for i in inputs if isinstance(i, dict)] if isinstance(inputs, list) else []
    names += list(consts) if isinstance(consts, dict) else []
    for node in tree["nodes"][:index]:
        if isinstance(node, dict) and isinstance(node.get("outputs"), list):
            names += node["outputs"]
    return [n for n in names if isinstance(n, str)]


def _attr_value(chooser: Chooser, kind: str):
    """A plausible (kind-correct) value for a required attribute of a swapped-in op."""
    from interp import schema

    small = chooser.pick([0, 1, -1, 2, 3, 16, 64])
    return {schema.INT: small, schema.INTS: [small, chooser.pick([1, -1, 16])], schema.FLOAT: 1.0,
            schema.BOOL: True, schema.DTYPE: chooser.pick(["float32", "int32", "bool"]), schema.STR: "none"}[kind]


def _swap_op(node: dict, chooser: Chooser) -> str:
    """Put another op of the same arity in ``node``, its attributes made to fit the new schema."""
    from interp import schema

    arity = len(node["inputs"])
    same = [spec for spec in schema.OPS.values() if len(spec.inputs) == arity and not spec.symbolic]
    if not same:
        return "no-op"
    spec = chooser.pick(same)
    attrs = {k: v for k, v in node.get("attrs", {}).items() if k in spec.attr_by_name}
    for arg in spec.attrs:
        if arg.required and arg.name not in attrs:
            attrs[arg.name] = _attr_value(chooser, arg.kind)
    node["op"], node["attrs"] = spec.name, attrs
    if spec.outputs[-1].endswith("..."):
        first = node["outputs"][0]
        node["outputs"] = node["outputs"][:1] + [f"{first}_{i}" for i in range(1, len(attrs.get("sizes", [0])))]
    elif len(spec.outputs) != len(node["outputs"]):
        node["outputs"] = [f"{node['outputs'][0]}_{i}" if i else node["outputs"][0] for i in range(len(spec.outputs))]
    return f"op -> {spec.name} {attrs}"


def mutate_json(tree: dict, chooser: Chooser, focus_table=PROGRAM_FOCUS) -> str:
    """Apply one mutation to ``tree`` (whatever earlier mutations made of it) in place;
    returns a short description of it."""
    focus = list(_focus(chooser, focus_table))
    if focus[:2] == ["consts", None] and isinstance(tree.get("consts"), dict) and tree["consts"]:
        focus[1] = chooser.pick(list(tree["consts"]))
    action = chooser.below(10)
    nodes = tree.get("nodes") if isinstance(tree.get("nodes"), list) else []
    wellformed = [i for i, n in enumerate(nodes) if isinstance(n, dict) and isinstance(n.get("inputs"), list)
                  and isinstance(n.get("outputs"), list) and n["outputs"] and isinstance(n.get("attrs", {}), dict)]
    if action <= 1 and wellformed:  # another op of the same arity: loads, then meets other shapes
        return _swap_op(nodes[chooser.pick(wellformed)], chooser)
    if action <= 3 and wellformed:  # rewire an input to a value defined earlier: loads, wrong shape/dtype
        index = chooser.pick(wellformed)
        node, names = nodes[index], _values_before(tree, index)
        if node["inputs"] and names:
            slot = chooser.below(len(node["inputs"]))
            node["inputs"][slot] = chooser.pick(names)
            return f"rewire {node.get('op')} input {slot} -> {node['inputs'][slot]}"
    if focus == ["nodes", "*", "attrs"] and wellformed:  # one attribute (or one item of it)
        attrs = nodes[chooser.pick(wellformed)].get("attrs", {})
        if isinstance(attrs, dict) and attrs:
            key = chooser.pick(list(attrs))
            value = attrs[key]
            if isinstance(value, list) and value and chooser.chance(60):
                item = chooser.below(len(value))
                value[item] = nasty_value(chooser, value[item])
                return f"attr {key}[{item}] = {value[item]!r:.60}"
            attrs[key] = nasty_value(chooser, value)
            return f"attr {key} = {attrs[key]!r:.60}"
    parent, key = _containers(tree, chooser, focus)
    if parent is None:
        return "no-op"
    if action == 4:  # remove
        del parent[key]
        return f"delete {key!r}"
    if action == 5 and isinstance(parent, list):  # swap within a list
        other = chooser.below(len(parent))
        parent[key], parent[other] = parent[other], parent[key]
        return f"swap {key} <-> {other}"
    parent[key] = nasty_value(chooser, parent[key])
    return f"set {key!r} = {parent[key]!r:.60}"


# ----------------------------------------------------------------------------- file mutations


def _read_safetensors(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length]), data[8 + length:]


def _write_safetensors(path: Path, header: dict, body: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def mutate_file(path: Path, chooser: Chooser) -> str:
    """Damage a binary file: a header field, a byte, its length."""
    data = path.read_bytes()
    kind = chooser.below(4)
    if kind == 0 and path.suffix == ".safetensors":
        try:
            header, body = _read_safetensors(path)
        except (ValueError, struct.error):  # damaged by an earlier mutation
            header = None
        if isinstance(header, dict):
            note = mutate_json(header, chooser, [(100, [])])
            _write_safetensors(path, header, body)
            return f"{path.name} header: {note}"
    if kind == 1:
        cut = chooser.below(len(data) + 1)
        path.write_bytes(data[:cut])
        return f"{path.name} truncated to {cut}"
    if kind == 2:
        at = chooser.below(min(len(data), 16)) if chooser.chance(50) else chooser.below(len(data))
        flipped = bytearray(data)
        flipped[at] ^= 1 << chooser.below(8)
        path.write_bytes(bytes(flipped))
        return f"{path.name} bit flipped at {at}"
    path.write_bytes(data + bytes(chooser.below(64)))
    return f"{path.name} extended"


def mutate_tokenizer(directory: Path, chooser: Chooser) -> str:
    kind = chooser.below(3)
    if kind == 0:
        template = chooser.pick(NASTY_TEMPLATES)
        (directory / "chat_template.jinja").write_text(template, encoding="utf-8")
        return f"template {template[:40]!r}"
    config = directory / "tokenizer_config.json"
    if kind == 1:
        config.write_text(chooser.pick(["{", "[" * 100000, "1" * 5000, "null", '{"chat_template": 5}',
                                        '{"chat_template": [{"name": "default", "template": 3}]}',
                                        '{"eos_token": {"content": 7}, "bos_token": []}']), encoding="utf-8")
        return "tokenizer_config.json replaced"
    return mutate_file(directory / "tokenizer.json", chooser)


# ----------------------------------------------------------------------------- cases


@dataclass
class Case:
    """A mutated copy of a program (``kind`` "program") or compiled program ("artifact")."""

    kind: str
    notes: list[str] = field(default_factory=list)


def mutate_program(directory: Path, chooser: Chooser, count: int) -> Case:
    case = Case("program")
    for _ in range(count):
        roll = chooser.below(100)
        if roll < 65:
            tree = json.loads((directory / "prog.json").read_text())
            case.notes.append("prog.json: " + mutate_json(tree, chooser))
            (directory / "prog.json").write_text(json.dumps(tree))
        elif roll < 80:
            case.notes.append(mutate_file(directory / "consts.safetensors", chooser))
        else:
            case.notes.append(mutate_tokenizer(directory, chooser))
    return case


ARTIFACT_FOCUS = [(25, ["base"]), (25, ["prefix_ids"]), (15, ["layout"]), (10, ["generation"]),
                  (25, [])]


def mutate_artifact(directory: Path, chooser: Chooser, count: int) -> Case:
    case = Case("artifact")
    for _ in range(count):
        if chooser.chance(60):
            tree = json.loads((directory / "program.json").read_text())
            case.notes.append("program.json: " + mutate_json(tree, chooser, ARTIFACT_FOCUS))
            (directory / "program.json").write_text(json.dumps(tree))
        else:
            case.notes.append(mutate_file(directory / "prefix.safetensors", chooser))
    return case


def program_command(directory: Path, chooser: Chooser) -> list[str]:
    return chooser.pick([
        ["run", str(directory), "--prompt", "Hello there", "-n", "4"],
        ["run", str(directory), "--prompt", "Hi", "--raw", "-n", "3"],
        ["run", str(directory), "--prompt", "(A) cat", "--system", "Be brief.", "-n", "5", "--temperature", "0.7",
         "--seed", "1"],
        ["inspect", str(directory)],
    ])


def artifact_command(directory: Path, base: Path) -> list[str]:
    return ["call", str(directory), "(A) cat (B) dog", "Hello", "--base", str(base), "-n", "4"]


# ----------------------------------------------------------------------------- running


def _limit_resources() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


@dataclass
class Outcome:
    verdict: str  # "ok", "error" (one paw: error line, exit 1) or a failure: "signal", "hang", "raw"
    detail: str = ""

    @property
    def acceptable(self) -> bool:
        return self.verdict in ("ok", "error")


def run_paw(args: list[str], timeout: float = TIMEOUT) -> Outcome:
    """Run ``paw ARGS`` in a subprocess under the memory cap and classify how it ended."""
    env = child_env(PAW_DEBUG="1", TOKENIZERS_PARALLELISM="false")
    try:
        done = subprocess.run([sys.executable, "-m", "apps.cli", *args], capture_output=True, text=True,
                              errors="replace", timeout=timeout, cwd=ROOT, env=env, preexec_fn=_limit_resources,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return Outcome("hang", f"no exit after {timeout:g} s")
    return classify(done.returncode, done.stderr)


def classify(returncode: int, stderr: str) -> Outcome:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    if returncode == 0 and "Traceback" not in stderr:
        return Outcome("ok")
    if returncode < 0:
        return Outcome("signal", f"killed by signal {-returncode}: {stderr[-500:]}")
    # PAW_DEBUG=1 prints a PawError's traceback (with its causes) before the one line; an
    # unexpected exception is re-raised instead and never reaches a `paw: error:` line.
    tail = stderr[stderr.rfind("Traceback"):] if "Traceback" in stderr else ""
    if (returncode == 1 and lines and lines[-1].startswith("paw: error: ") and "PAW_DEBUG" not in lines[-1]
            and (len(lines) == 1 or re.search(r"^interp\.errors\.\w+: ", tail, re.MULTILINE))):
        return Outcome("error", lines[-1])
    return Outcome("raw", f"exit {returncode}: {stderr[-1500:]}")


def prepare_case(kind: str, program: Path, artifact: Path | None, workdir: Path, chooser: Chooser,
                 mutations: int) -> tuple[Case, list[str]]:
    """Copy and mutate one case in ``workdir``; returns what was done and the ``paw`` arguments that run it."""
    if kind == "program":
        target = workdir / "prog"
        shutil.copytree(program, target)
        case = mutate_program(target, chooser, mutations)
        return case, program_command(target, chooser)
    target = workdir / "art"
    shutil.copytree(artifact, target)
    return mutate_artifact(target, chooser, mutations), artifact_command(target, program)


def fuzz_case(kind: str, program: Path, artifact: Path | None, workdir: Path, chooser: Chooser,
              mutations: int) -> tuple[Case, Outcome, list[str]]:
    """Copy, mutate and run one case in ``workdir``; returns what was done and how it ended."""
    case, args = prepare_case(kind, program, artifact, workdir, chooser, mutations)
    return case, run_paw(args), args


def make_bases(directory: Path) -> tuple[Path, Path]:
    """A tiny exported program and a program compiled on it, for fuzzing outside pytest."""
    from tests.tiny import export_tiny, make_tokenizer, tiny_llama_config

    program = export_tiny(tiny_llama_config(), directory / "tiny", tokenizer=make_tokenizer())
    compile_artifact(program, directory / "tiny-program")
    return program, directory / "tiny-program"


def compile_artifact(program: Path, out: Path) -> Path:
    import paw_mlx

    paw_mlx.compile("Parse the options into a JSON list.", base=program, out_dir=out, max_new_tokens=8)
    return out
