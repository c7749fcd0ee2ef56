"""Hostile inputs for the surfaces tests/fuzzing.py does not reach: HTTP bodies of ``paw serve``,
``.paw`` bundles, ``--examples`` files, CLI arguments and model sources of ``paw export``.

Each generator draws from a ``Chooser`` (tests/fuzzing.py), so the suite (tests/test_hostile.py)
runs a few seeded cases per surface and ``scripts/fuzz.py --surface ...`` runs thousands. The
checks are the reliability rule (docs/reliability.md): a 4xx with OpenAI's error object and a
server that answers the next request; a ``PawError`` of one line; or success.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from tests.fuzzing import NASTY_NUMBERS, NASTY_TEMPLATES, Chooser, mutate_file, mutate_json

GOOD_CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
GOOD_COMPLETION = {"model": "tiny", "prompt": "hi", "max_tokens": 3}
#: the request fields a hostile value is put in (besides every field of the good body)
FIELDS = ["max_tokens", "n", "temperature", "top_p", "top_k", "min_p", "logprobs", "top_logprobs", "seed",
          "logit_bias", "stop", "presence_penalty", "frequency_penalty", "repetition_penalty", "response_format",
          "tools", "tool_choice", "stream", "stream_options", "chat_template_kwargs", "reasoning_effort",
          "functions", "function_call", "max_completion_tokens", "echo", "best_of", "suffix", "prompt", "messages"]
HOSTILE_VALUES = [None, True, False, "", "x", "x" * 20000, "\ud800", "\x00", [], {}, [None], [[[[]]]], [1, "a"],
                  {"": None}, ["x"] * 300, {"type": "zzz"}, [{"type": "text"}], [{"role": "tool"}],
                  float("nan"), float("inf"), -float("inf"), *NASTY_NUMBERS,
                  [1, "a"] * 20000, [{"role": "x"}] * 20000]  # long lists of bad items (one error, not 40,000)
#: whole values of structured fields: recursive and impossible schemas, unknown names, odd parts
STRUCTURED = {
    "messages": [[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
                 [{"role": "user", "content": [{"type": "zzz", "text": "a"}]}], [{"role": "user", "content": [{}]}],
                 [{"role": "assistant", "content": None}], [{"role": "tool", "content": "x"}],
                 [{"role": "function", "content": "x"}], [{"role": "user", "content": []}],
                 [{"role": "assistant", "content": None, "tool_calls": [{"id": "1", "function": {
                     "name": "f", "arguments": "{bad"}}]}],
                 [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "system"}]],
    "tools": [[{"type": "function", "function": {"name": "f", "parameters": {"$ref": "#"}}}],
              [{"type": "function", "function": {"name": "f", "parameters": {"type": "banana"}}}],
              [{"type": "function", "function": {"name": "f", "parameters": {
                  "type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}}}],
              [{"type": "function", "function": {"name": "f", "parameters": {"type": "string", "pattern": "(("}}}],
              [{"type": "function", "function": {"name": "f"}}] * 2],
    "tool_choice": ["required", {"type": "function", "function": {"name": "nope"}}, {"type": "function"}],
    "response_format": [{"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#"}}},
                        {"type": "json_schema", "json_schema": {"name": "x", "schema": {
                            "type": "string", "minLength": 10**15}}},
                        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"anyOf": []}}},
                        {"type": "json_schema", "json_schema": {"name": "x", "schema": {
                            "type": "object",
                            "properties": {f"k{i}": {"type": "integer", "minimum": 1e308} for i in range(300)}}}},
                        {"type": "json_schema"}, {"type": "json_object"}],
    "logit_bias": [{"-1": 5}, {"99999999999999999999": 1}, {"abc": 1}, {"1e3": 1}, {" 5": 1}, {"\u0663": 1},
                   {str(i): 1 for i in range(3000)}, {"5": 1e-320}, {"5": 100, "05": 100}, {"+5": 1}],
    "stop": [["x" * 100000], [""], [""] * 16, ["a"] * 17],
    "chat_template_kwargs": [{"messages": 5}, {"tools": 5}, {"add_generation_prompt": "x"}, {"bos_token": None}],
    "prompt": [[], [[]], [-1], [10**9], [[1], [2**63]], [1.5], [True], [""] * 65],
}


def _paths(node, path: tuple = ()) -> list[tuple]:
    """Every path to a value inside ``node`` (dict keys and list indices)."""
    found = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        found.append(path + (key,))
        found += _paths(value, path + (key,))
    return found


def hostile_body(chooser: Chooser) -> tuple[str, dict]:
    """(route, body): a good chat or completion request with one to three fields made hostile."""
    chat = chooser.chance(60)
    route, body = ("/v1/chat/completions", copy.deepcopy(GOOD_CHAT)) if chat else \
        ("/v1/completions", copy.deepcopy(GOOD_COMPLETION))
    for _ in range(1 + chooser.below(3)):
        if chooser.chance(50):
            field = chooser.pick(FIELDS)
            choices = STRUCTURED.get(field)
            value = chooser.pick(choices) if choices and chooser.chance(60) else chooser.pick(HOSTILE_VALUES)
            body[field] = copy.deepcopy(value)  # later mutations edit it in place
        else:
            path = chooser.pick(_paths(body))
            node = body
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = copy.deepcopy(chooser.pick(HOSTILE_VALUES))
    return route, body


RAW_BODIES = [b"", b"{", b"[]", b"null", b"5", b'"x"', b"\xff\xfe\x00", b"[" * 100000, b'{"a":' * 50000,
              b"\x00" * 64, b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}',
              json.dumps(GOOD_CHAT).encode("utf-16"), b"\xef\xbb\xbf" + json.dumps(GOOD_CHAT).encode()]
CONTENT_TYPES = [None, "text/plain", "multipart/form-data; boundary=x", "application/json; charset=utf-16",
                 "application/x-www-form-urlencoded", "application/json; charset=nonsense", "*/*"]


def encode_body(body) -> bytes:
    """``body`` as JSON bytes, hostile parts included: NaN, infinities, lone surrogates."""
    return json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")


# ----------------------------------------------------------------------------- .paw bundles


def mutate_bundle(members: dict, chooser: Chooser) -> tuple[dict, str]:
    """A copy of a bundle's members ({name: bytes or str}) with one part damaged; and what was done."""
    members = dict(members)
    kind = chooser.below(6)
    if kind == 0:
        try:
            meta = json.loads(members.get("meta.json", "{}"))
        except (ValueError, RecursionError):
            meta = None
        meta = meta if isinstance(meta, dict) else {}
        key = chooser.pick(["program_id", "interpreter", "spec", "runtime", "runtime_manifest_version", "extra"])
        meta[key] = chooser.pick(HOSTILE_VALUES + ["0123456789abcdef", "g" * 70, {"input": 1}, 2])
        members["meta.json"] = encode_body(meta)
        return members, f"meta.json {key} = {meta[key]!r:.40}"
    if kind == 1:
        members["meta.json"] = chooser.pick([b"", b"[]", b"null", b"{", b"[" * 100000, b"1" * 5000, b"\xff\xfe",
                                             b'{"program_id": "0123456789abcdef", "interpreter": "x", "a": NaN}'])
        return members, "meta.json replaced"
    if kind == 2:
        data = bytearray(members.get("adapter.gguf", b"GGUF"))
        at = chooser.below(min(len(data), 4096))
        how = chooser.below(3)
        if how == 0:
            data = data[:at]
        elif how == 1:
            data[at] ^= 1 << chooser.below(8)
        else:
            data[at:at + 8] = chooser.pick([b"\xff" * 8, b"\x00" * 8, (2**40).to_bytes(8, "little")])
        members["adapter.gguf"] = bytes(data)
        return members, f"adapter.gguf damaged at {at} ({('cut', 'bit', 'word')[how]})"
    if kind == 3:
        members["prompt_template.txt"] = chooser.pick(
            ["{INPUT_PLACEHOLDER}", "a{INPUT_PLACEHOLDER}" * 2, b"\xff{INPUT_PLACEHOLDER}", "",
             "<|im_start|>" * 3000 + "{INPUT_PLACEHOLDER}",
             "\ud800{INPUT_PLACEHOLDER}".encode("utf-8", "surrogatepass")])
        return members, "prompt_template.txt replaced"
    if kind == 4:
        members[chooser.pick(["pseudo_program.txt", "run.sh", "../meta.json", "/abs"])] = chooser.pick([b"\xff", b"x"])
        return members, "member added"
    name = chooser.pick(sorted(members))
    del members[name]
    return members, f"{name} removed"


# ----------------------------------------------------------------------------- examples files


EXAMPLE_LINES = ['{"input": "a", "output": "b"}', '{"input": 1, "output": "b"}', '{"input": "a"}', "[]", "null",
                 '"text"', "{", "[" * 100000, "1" * 5000, '{"input": "a", "output": "b", "split": []}',
                 '{"input": "a", "output": "b", "split": "dev"}', '{"input": "\\ud800", "output": "b"}',
                 '{"input": NaN, "output": "b"}', '{"input": "' + "x" * 200000 + '", "output": "b"}', "", "   ",
                 '{"input": "a", "output": "b"}\u2028{"input": "c", "output": "d"}',
                 '{"input": {"a": 1}, "output": "b"}']


def hostile_examples(chooser: Chooser) -> bytes:
    """The bytes of an --examples file: a few lines of JSON garbage among good lines, in some encoding."""
    lines = [chooser.pick(EXAMPLE_LINES) for _ in range(1 + chooser.below(4))]
    text = "\n".join(lines)
    encoding = chooser.below(4)
    if encoding == 0:
        return text.encode("utf-16")
    if encoding == 1:
        return text.encode("utf-8", "surrogatepass") + b"\xff\xfe\x80"
    return text.encode("utf-8", "surrogatepass")


# ----------------------------------------------------------------------------- CLI arguments


def cli_cases(program: Path, tmp: Path) -> list[list[str]]:
    """``paw`` argument lists with one out-of-range number, empty string or wrong kind of path each."""
    missing, a_file = tmp / "missing", tmp / "file.txt"
    a_file.write_text("x")
    p = str(program)
    return [
        ["run", p, "-p", "hi", "-n", "-1"], ["run", p, "-p", "hi", "-t", "nan"], ["run", p, "-p", "hi", "--top-p", "2"],
        ["run", p, "-p", "hi", "--top-k", "-3"], ["run", p, "-p", "hi", "--min-p", "inf"],
        ["run", p, "-p", "hi", "--logit-bias", "5=nan"], ["run", p, "-p", "hi", "--logit-bias", "99999999=1"],
        ["run", p, "-p", "hi", "--seed", str(2**70)], ["run", p, "-p", "hi", "--repetition-penalty", "0"],
        ["run", p, "--prompt-ids", str(a_file)], ["run", p, "--prompt-ids", str(tmp)], ["run", str(a_file), "-p", "x"],
        ["run", p, "-p", "hi", "-n", "1", "--output-ids", str(tmp)], ["run", "", "-p", "x"],
        ["inspect", str(missing)], ["decode", str(missing), "-p", p], ["decode", str(tmp), "-p", p],
        ["export", "hf", str(a_file), "-o", str(tmp / "o")], ["export", "hf", p, "-o", p],
        ["export", "hf", str(missing), "-o", str(tmp / "o"), "--group-size", "-5", "--quantize", "4"],
        ["export", "hf", str(missing), "-o", str(tmp / "o"), "--max-shard-size", "-1GB"],
        ["compile", "", "-o", str(tmp / "c"), "--base", p], ["compile", "@" + str(missing), "-o", str(tmp / "c")],
        ["compile", "spec", "-o", str(tmp / "c"), "--base", p, "--examples", str(tmp)],
        ["compile", "spec", "-o", str(tmp / "c"), "--base", p, "--folds", "0", "--examples", str(a_file)],
        ["call", str(missing), "x"], ["call", str(a_file), "x"], ["serve", p, "--port", "70000"],
        ["serve", p, "--max-rows", "0"], ["bench", "--help-me"],
    ]


# ----------------------------------------------------------------------------- model sources

#: chat templates beyond tests/fuzzing.py's: ones run time refuses, ones it runs (Gemma's raise on system)
SOURCE_TEMPLATES = NASTY_TEMPLATES + [
    "{% for m in messages %}<|im_start|>{{ m['role'] }}<|im_end|>{% endfor %}",  # drops the user's text
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}{{ m['content'] }}{% endfor %}",
    "{% for m in messages %}{{ m['content'] }}", "{{ messages[0]['content'] }}", b"\xff\xfe{{ x }}"]
#: the JSON files of a model folder a mutation may edit
SOURCE_JSON = ["config.json", "generation_config.json", "tokenizer_config.json"]


def mutate_source(folder: Path, chooser: Chooser) -> str:
    """Damage one part of a Hugging Face model folder: a field of a JSON file, the weights'
    safetensors header or bytes, the tokenizer, the chat template; returns what was done."""
    kind = chooser.below(4)
    if kind == 0:
        path = folder / chooser.pick(SOURCE_JSON)
        try:
            tree = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # damaged by an earlier mutation
            tree = None
        if isinstance(tree, dict) and tree:
            note = mutate_json(tree, chooser, [(100, [])])
            path.write_text(json.dumps(tree), encoding="utf-8")
            return f"{path.name}: {note}"
    if kind <= 1:
        return mutate_file(folder / "model.safetensors", chooser)
    if kind == 2:
        template = chooser.pick(SOURCE_TEMPLATES)
        (folder / "chat_template.jinja").write_bytes(template if isinstance(template, bytes) else template.encode())
        return f"template {template[:40]!r}"
    return mutate_file(folder / chooser.pick(["tokenizer.json", "config.json"]), chooser)


# ----------------------------------------------------------------------------- checks


def check_response(response) -> str | None:
    """None when an HTTP answer keeps the rule (below 500; a 4xx carries OpenAI's error object), else why not."""
    if response.status_code >= 500:
        return f"{response.status_code}: {response.text[:300]}"
    if response.status_code >= 400:
        try:
            error = response.json()["error"]
        except (ValueError, KeyError, TypeError):
            return f"{response.status_code} without an error object: {response.text[:300]}"
        if not (isinstance(error, dict) and error.get("message") and error.get("type")):
            return f"{response.status_code} with an incomplete error object: {response.text[:300]}"
    return None


def check_paw_call(function, *args) -> str | None:
    """None when ``function(*args)`` succeeds or raises a one-line PawError; else the unexpected exception."""
    from interp.errors import PawError

    try:
        function(*args)
    except PawError as exc:
        return f"a PawError of several lines: {exc}" if "\n" in str(exc) else None
    except Exception as exc:  # anything else is the bug this looks for
        return f"{type(exc).__name__}: {str(exc)[:300]}"
    return None


def write_bundle(path: Path, members: dict) -> Path:
    """A zip of ``members`` ({name: str or bytes}) at ``path``."""
    import stat
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        for name, content in members.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            archive.writestr(info, content)
    return path


# ----------------------------------------------------------------------------- campaigns


def request_campaign(client, chooser: Chooser, cases: int) -> list[str]:
    """Send ``cases`` hostile bodies, then every raw body and Content-Type; the failures, described."""
    failures = []

    def send(what: str, route: str, content: bytes, headers: dict) -> None:
        problem = check_response(client.post(route, content=content, headers=headers))
        if problem:
            failures.append(f"{route} {what}: {problem}")

    for _ in range(cases):
        route, body = hostile_body(chooser)
        send(repr(encode_body(body)[:300]), route, encode_body(body), {"content-type": "application/json"})
    for raw in RAW_BODIES:
        for route in ("/v1/chat/completions", "/v1/completions"):
            send(repr(raw[:60]), route, raw, {"content-type": "application/json"})
    for kind in CONTENT_TYPES:
        send(f"Content-Type {kind}", "/v1/chat/completions", encode_body(GOOD_CHAT),
             {} if kind is None else {"content-type": kind})
    return failures


def bundle_campaign(base: Path, good: dict, work: Path, chooser: Chooser, cases: int) -> list[str]:
    """Load ``cases`` mutated copies of the bundle ``good`` on ``base``; the failures, described."""
    from paw_mlx.programs.pawfile import load_bundle

    failures = []
    for case in range(cases):
        parts, notes = good, []
        for _ in range(1 + chooser.below(2)):
            parts, note = mutate_bundle(parts, chooser)
            notes.append(note)
        problem = check_paw_call(load_bundle, write_bundle(work / "case.paw", parts), base)
        if problem:
            failures.append(f"case {case} {notes}: {problem}")
    return failures


def examples_campaign(work: Path, chooser: Chooser, cases: int) -> list[str]:
    """Read ``cases`` hostile --examples files; the failures, described."""
    from paw_mlx.programs.examples import load_examples

    failures = []
    for case in range(cases):
        path = work / "examples.jsonl"
        data = hostile_examples(chooser)
        path.write_bytes(data)
        problem = check_paw_call(load_examples, path)
        if problem:
            failures.append(f"case {case} {data[:200]!r}: {problem}")
    return failures


def source_campaign(folder: Path, work: Path, chooser: Chooser, cases: int) -> list[str]:
    """Export ``cases`` damaged copies of the model folder ``folder`` (in process); the failures, described.

    An export ends in a program the loader takes and whose chat template renders a prompt, or in
    one PawError line with nothing written (no output, no partial directory).
    """
    import shutil

    import paw_mlx
    from exporter.export import export_source

    def refused_at_run(out: Path) -> str | None:
        try:
            paw_mlx.prompt_ids(paw_mlx.load(out), "hi")
        except Exception as exc:  # a PawError too: what paw export accepts, paw run must take
            return f"exported, then {type(exc).__name__}: {exc}"
        return None

    failures = []
    for case in range(cases):
        source, out = work / f"source-{case}", work / f"out-{case}"
        shutil.copytree(folder, source)
        notes = [mutate_source(source, chooser) for _ in range(1 + chooser.below(2))]
        problem = check_paw_call(export_source, str(source), out)
        if problem is None and out.exists():
            problem = refused_at_run(out)
        leftovers = sorted(p.name for p in work.iterdir() if p.name.startswith(f".out-{case}."))
        if problem or leftovers:
            failures.append(f"case {case} {notes}: {problem or f'left {leftovers}'}")
        shutil.rmtree(source, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    return failures


def cli_campaign(cases: list[list[str]]) -> list[str]:
    """Run each ``paw`` argument list (tests/fuzzing.run_paw); the ones that ended otherwise than
    in success, one ``paw: error:`` line or click's usage error (exit 2)."""
    from tests.fuzzing import run_paw

    failures = []
    for args in cases:
        outcome = run_paw(args)
        if not (outcome.acceptable or outcome.detail.startswith("exit 2: Usage:")):
            failures.append(f"paw {' '.join(args)}: {outcome.verdict}: {outcome.detail}")
    return failures
