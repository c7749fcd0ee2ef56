"""programasweights .paw bundles: tiny random qwen3 and gpt2 bases, adapters written with the gguf
package, paw's greedy tokens against the adapter merged into the weights by a float reference;
malformed bundles are one clear line and write nothing."""

from __future__ import annotations

import copy
import functools
import json
import stat
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import paw_mlx
from interp.errors import ArtifactError
from paw_mlx.programs.pawfile import export_bundle, read_bundle
from tests.archs import arch_config
from tests.tiny import export_tiny, tiny_model

TEMPLATE = ("<|im_start|>system\nUpper.<|im_end|>\n<|im_start|>user\n{INPUT_PLACEHOLDER}<|im_end|>\n"
            "<|im_start|>assistant\n")
RANK, ALPHA = 32, 16.0
# llama.cpp tensor name -> (transformers module, Conv1D weight stored [in, out])
MODULES = {
    "qwen3": {f"blk.{i}.{g}": (f"model.layers.{i}.{h}", False) for i in range(2) for g, h in
              [("attn_q", "self_attn.q_proj"), ("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj"),
               ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj")]},
    "gpt2": {f"blk.{i}.{g}": (f"transformer.h.{i}.{h}", True) for i in range(2) for g, h in
             [("attn_qkv", "attn.c_attn"), ("attn_output", "attn.c_proj"), ("ffn_up", "mlp.c_fc"),
              ("ffn_down", "mlp.c_proj")]},
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("paw-bases")
    return {arch: export_tiny(arch_config(arch), root / arch, tokenizer=tiny_tokenizer) for arch in MODULES}


@functools.cache
def torch_model(arch: str):
    """The tiny random torch model the base program of ``arch`` was exported from (seed 0)."""
    return tiny_model(arch_config(arch))


def module_shapes(model, arch):
    shapes = {}
    for name, (module, conv1d) in MODULES[arch].items():
        weight = model.get_submodule(module).weight
        out_features, in_features = (weight.shape[1], weight.shape[0]) if conv1d else weight.shape
        shapes[name] = (in_features, out_features)
    return shapes


def gguf_adapter(arch: str, qtype: str, seed: int = 0) -> tuple[bytes, dict]:
    """A llama.cpp LoRA written with gguf's own writer, and its float values as read back."""
    shapes = module_shapes(torch_model(arch), arch)
    rng = np.random.default_rng(seed)
    kind = gguf.GGMLQuantizationType[qtype]
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "a.gguf"
        writer = gguf.GGUFWriter(file, arch)
        writer.add_string("general.type", "adapter")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", ALPHA)
        for name, (in_features, out_features) in shapes.items():
            for half, shape in (("a", (RANK, in_features)), ("b", (out_features, RANK))):
                values = (rng.standard_normal(shape) * 0.15).astype(np.float32)
                if qtype in ("F32", "F16"):
                    dtype = np.float16 if qtype == "F16" else np.float32
                    writer.add_tensor(f"{name}.weight.lora_{half}", values.astype(dtype))
                else:
                    writer.add_tensor(f"{name}.weight.lora_{half}", gguf.quants.quantize(values, kind),
                                      raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        data = file.read_bytes()
        reader = gguf.GGUFReader(file)
        floats = {t.name: np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(
            tuple(reversed(t.shape.tolist()))) for t in reader.tensors}
    return data, floats


def zip_bundle(path, members: dict, modes: dict | None = None):
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in members.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (modes or {}).get(name, stat.S_IFREG | 0o644) << 16
            archive.writestr(info, content)
    return path


def members(adapter: bytes, interpreter: str = "Qwen/Qwen3-0.6B") -> dict:
    meta = {"program_id": "0123456789abcdef0123", "interpreter": interpreter, "spec": "Upper."}
    return {"meta.json": json.dumps(meta), "adapter.gguf": adapter, "prompt_template.txt": TEMPLATE}


def reference_tokens(arch: str, floats: dict, ids: list[int], steps: int) -> list[int]:
    """Greedy tokens of the torch model with the adapter merged into its float weights."""
    model = copy.deepcopy(torch_model(arch))
    with torch.no_grad():
        for name, (module, conv1d) in MODULES[arch].items():
            a, b = floats[f"{name}.weight.lora_a"], floats[f"{name}.weight.lora_b"]
            update = torch.from_numpy(ALPHA / RANK * (b @ a))  # [out, in]
            weight = model.get_submodule(module).weight
            weight += update.T if conv1d else update
        out, tokens = [], torch.tensor([ids])
        for _ in range(steps):
            token = int(model(tokens).logits[0, -1].argmax())
            if token == 2:  # <|im_end|>
                break
            out.append(token)
            tokens = torch.cat([tokens, torch.tensor([[token]])], dim=1)
    return out


@pytest.mark.parametrize("arch, qtype", [("qwen3", "Q4_0"), ("qwen3", "F16"), ("gpt2", "Q8_0"), ("gpt2", "F32")])
def test_bundle_tokens_equal_the_merged_float_reference(bases, tmp_path, arch, qtype):
    adapter, floats = gguf_adapter(arch, qtype)
    bundle = zip_bundle(tmp_path / "p.paw", members(adapter, "Qwen/Qwen3-0.6B" if arch == "qwen3" else "gpt2"))
    f = paw_mlx.function(bundle, base=bases[arch], max_new_tokens=10)
    tok = f.base.tokenizer
    prefix, suffix = TEMPLATE.split("{INPUT_PLACEHOLDER}")
    for text in ["cat", "sun and moon"]:
        ids = f.token_ids(text)
        assert f.artifact.prefix_ids == tok.encode(prefix, add_special_tokens=False)
        assert ids == tok.encode(text + suffix, add_special_tokens=False)
        got = f.call_ids([ids])[0]
        assert got == reference_tokens(arch, floats, f.artifact.prefix_ids + ids, 10), (arch, qtype, text)
        assert len(got) > 0
    plain = paw_mlx.function(paw_mlx.compile("Upper.", base=bases[arch]), max_new_tokens=10)
    assert f.call_ids([f.token_ids("cat")]) != plain.call_ids([plain.token_ids("cat")])  # the adapter matters


def test_export_program_writes_a_program_and_compile_writes_a_bundle(bases, tmp_path):
    adapter, _ = gguf_adapter("qwen3", "Q8_0")
    bundle = zip_bundle(tmp_path / "p.paw", members(adapter))
    run = subprocess.run([sys.executable, "-m", "apps.cli", "export", "program", str(bundle), "-o",
                          str(tmp_path / "prog"), "--base", str(bases["qwen3"])], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    via_dir = paw_mlx.function(tmp_path / "prog", max_new_tokens=8)
    via_paw = paw_mlx.function(bundle, base=bases["qwen3"], max_new_tokens=8)
    assert via_dir(["cat", "dog"]) == via_paw(["cat", "dog"])
    assert via_dir.artifact.adapter.rank == RANK and via_dir.artifact.generation.strip

    rows = [{"input": w, "output": w.upper()} for w in ["cat", "dog", "sun", "red"]]
    out = tmp_path / "made.paw"
    from paw_mlx.programs.pawfile import compile_bundle
    from paw_mlx.programs.select import SelectOptions
    from paw_mlx.programs.train import TrainOptions

    made = compile_bundle("Upper.", out, base=bases["qwen3"], examples=rows,
                          options=SelectOptions(folds=2, lora=TrainOptions(steps=2, layers=1, rank=4)))
    back = read_bundle(out)
    assert made.adapter.rank == 2 * 4  # the mean of the two folds' rank-4 adapters, exactly
    assert sorted(zipfile.ZipFile(out).namelist()) == ["adapter.gguf", "meta.json", "prompt_template.txt",
                                                       "pseudo_program.txt"]
    assert back.meta["interpreter"] == "tiny-random-qwen3" and back.template.count("{INPUT_PLACEHOLDER}") == 1
    reread = paw_mlx.function(out, base=bases["qwen3"], max_new_tokens=6)
    assert reread(["cat", "bee"]) == [o.strip() for o in paw_mlx.function(made, max_new_tokens=6)(["cat", "bee"])]


def test_a_bundle_holds_no_input_lead(bases, tmp_path):
    """The runtime appends a call's input as given: a compiled bundle's inputs get no lead (its
    outputs may: the runtime strips them), and a program with one is not written as a bundle."""
    from paw_mlx.programs.pawfile import compile_bundle, write_bundle
    from paw_mlx.programs.select import SelectOptions
    from paw_mlx.programs.train import TrainOptions

    rows = [{"input": i, "output": o} for i, o in [("cat", "dog"), ("dog", "cat"), ("capital", "dog"), ("bird", "cat")]]
    options = SelectOptions(candidates=("lora",), folds=2, lora=TrainOptions(steps=2, layers=1, rank=2))
    program = paw_mlx.compile("Animal.", base=bases["qwen3"], examples=rows, options=options)
    assert program.layout.input_lead == " "  # these words are shorter after a space
    with pytest.raises(ArtifactError, match="space before its inputs"):
        write_bundle(program, paw_mlx.function(program).base, tmp_path / "no.paw")
    assert not (tmp_path / "no.paw").exists()
    made = compile_bundle("Animal.", tmp_path / "yes.paw", base=bases["qwen3"], examples=rows, options=options)
    assert made.layout.input_lead == "" and made.layout.output_lead == " "
    reread = paw_mlx.function(tmp_path / "yes.paw", base=bases["qwen3"], max_new_tokens=6)
    assert reread(["cat", "bee"]) == [o.strip() for o in paw_mlx.function(made, max_new_tokens=6)(["cat", "bee"])]


def paw_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "apps.cli", *map(str, args)], capture_output=True, text=True)


@pytest.mark.parametrize("case, fragment", [
    ("missing", "missing member adapter.gguf"),
    ("traversal", "unsafe member path '../meta.json'"),
    ("absolute", "unsafe member path '/etc/meta.json'"),
    ("symlink", "is not a regular file"),
    ("unknown", "unknown member 'run.sh'"),
    ("oversized", "expands to"),
    ("other base", "was made for gpt2 (gpt2); the base program tiny-random-qwen3 is qwen3"),
    ("not a zip", "not a zip archive"),
    ("no placeholder", "exactly once"),
])
def test_malformed_bundles_are_one_line_and_write_nothing(bases, tmp_path, case, fragment):
    adapter, _ = gguf_adapter("qwen3", "F32")
    parts = members(adapter)
    modes = {}
    if case == "missing":
        del parts["adapter.gguf"]
    elif case == "traversal":
        parts["../meta.json"] = parts.pop("meta.json")
    elif case == "absolute":
        parts["/etc/meta.json"] = parts.pop("meta.json")
    elif case == "symlink":
        modes["pseudo_program.txt"] = stat.S_IFLNK | 0o777
        parts["pseudo_program.txt"] = "/etc/passwd"
    elif case == "unknown":
        parts["run.sh"] = "rm -rf /"
    elif case == "oversized":
        parts["meta.json"] = json.dumps({"program_id": "0123456789abcdef", "interpreter": "x", "pad": " " * (1 << 20)})
    elif case == "other base":
        parts = members(adapter, interpreter="gpt2")
    elif case == "no placeholder":
        parts["prompt_template.txt"] = "no slot here"
    path = tmp_path / "bad.paw"
    if case == "not a zip":
        path.write_bytes(b"just some bytes")
    else:
        zip_bundle(path, parts, modes)
    out = tmp_path / "out"
    with pytest.raises(ArtifactError) as error:
        export_bundle(path, out, base=bases["qwen3"])
    assert fragment in str(error.value) and "\n" not in str(error.value)
    if case == "other base":  # a qwen3 bundle on the gpt2 base
        zip_bundle(tmp_path / "q.paw", members(adapter))
        with pytest.raises(ArtifactError, match=r"was made for Qwen/Qwen3-0.6B \(qwen3\)"):
            export_bundle(tmp_path / "q.paw", out, base=bases["gpt2"])
    assert not out.exists() and {p.name for p in tmp_path.iterdir()} <= {"bad.paw", "q.paw"}


def test_cli_reports_a_bad_bundle_in_one_line(bases, tmp_path):
    zip_bundle(tmp_path / "bad.paw", {"../meta.json": "{}"})
    done = paw_cli("export", "program", tmp_path / "bad.paw", "-o", tmp_path / "out", "--base", bases["qwen3"])
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert lines[0] == f"paw: error: {tmp_path / 'bad.paw'}: unsafe member path '../meta.json' in the .paw archive"
    assert not (tmp_path / "out").exists()


def _damage_deflate(data: bytearray) -> None:
    """meta.json's deflated stream opens with a block of the reserved type 3 (zlib: 'invalid block type')."""
    name_length, extra_length = int.from_bytes(data[26:28], "little"), int.from_bytes(data[28:30], "little")
    data[30 + name_length + extra_length] = 0x07


def _damage_version(data: bytearray) -> None:
    """The central directory says meta.json needs zip version 25.5 to extract."""
    data[data.find(b"PK\x01\x02") + 6] = 255


@pytest.mark.parametrize("damage, fragment", [(_damage_deflate, "cannot read member meta.json"),
                                              (_damage_version, "not a zip archive: zip file version 25.5")],
                         ids=["deflate", "version"])
def test_a_damaged_zip_is_one_artifact_error(tmp_path, damage, fragment):
    """zlib.error and NotImplementedError escaped read_bundle (a traceback with PAW_DEBUG=1, and no PawError
    for the API)."""
    path = tmp_path / "bundle.paw"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, content in members(b"GGUF" + bytes(64)).items():
            info = zipfile.ZipInfo(name)
            info.external_attr, info.compress_type = (stat.S_IFREG | 0o644) << 16, zipfile.ZIP_DEFLATED
            archive.writestr(info, content)
    data = bytearray(path.read_bytes())
    damage(data)
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=fragment) as error:
        read_bundle(path)
    assert "\n" not in str(error.value)
