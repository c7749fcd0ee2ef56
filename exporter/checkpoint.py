"""Stream a checkpoint's weights into an export, one tensor at a time.

``load_streaming`` runs transformers' own ``from_pretrained`` (config, generation config,
tokenizer, dtype rules, tied weights, non-persistent buffers such as RoPE's ``inv_freq``:
everything that shapes the captured graph comes out exactly as for a loaded model) with
three of its steps replaced for the duration of the call:

- loading the weights into the model (``convert_and_load_state_dict_in_model``) becomes
  *planning* them: each parameter is left on the meta device and remembered with the
  checkpoint tensors and conversion (transformers' ``WeightConverter``s: experts stacked,
  projections split, renames) that produce it;
- safetensors files are read with ``preadv`` rather than memory-mapped
  (``exporter.pread``), so a file's pages do not stay resident once a tensor has been
  copied out of it;
- a GGUF file is read lazily: each tensor is dequantized and passed through transformers'
  tensor processor (Llama's q/k permutation, Gemma's norm offset) when it is asked for,
  instead of the whole file at load time.

The export captures the graph on a model whose parameters are untouched ``torch.empty``
tensors (no page of them is ever written, so none is resident), and each const of the
program becomes a ``LazyTensor`` that asks the plan for its weight when the writer gets
to it. ``CheckpointWeights.gguf_tensor`` gives the GGUF tensor behind a weight for the exports
that keep them (``exporter.gguf_blocks``).

Sources that cannot stream raise ``NotStreamable``, and the exporter loads them whole:
checkpoints quantized by another library (a ``quantization_config``: BitNet, GPTQ, AWQ,
...), and GGUF files whose loader merges or renames tensors while it reads them (MoE
expert stacks, GPT-2's output matrix).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from exporter.lazy import LazyTensor
from interp.errors import ExportError

#: transformers' legacy GGUF tensor processors that keep each tensor's name (they only
#: permute or offset values), so a tensor can be read alone; the others merge tensors.
NAME_KEEPING_PROCESSORS = {
    "TensorProcessor", "LlamaTensorProcessor", "BloomTensorProcessor", "T5TensorProcessor",
    "MambaTensorProcessor", "NemotronTensorProcessor", "Gemma2TensorProcessor", "Lfm2TensorProcessor",
}


class NotStreamable(Exception):
    """This source has to be loaded whole (the message says why)."""


# ----------------------------------------------------------------------------- the plan


@dataclass
class _Group:
    """One target of transformers' loader: a conversion and the checkpoint tensors it reads."""

    template: Any  # a WeightConverter or WeightRenaming with nothing collected yet
    entries: list[tuple[str, str, str, Any, torch.dtype | None]] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)


@dataclass
class LoadPlan:
    """Model parameter name -> how to compute it from the checkpoint."""

    model: Any = None
    hf_quantizer: Any = None
    info: Any = None
    groups: dict[str, _Group] = field(default_factory=dict)  # first target -> group
    owner: dict[str, str] = field(default_factory=dict)  # every target -> its group's first target
    #: the other targets of the latest conversion that made several (q, k, v split from one
    #: checkpoint tensor are usually asked for one after the other); dropped when used
    _pending: dict[str, torch.Tensor] = field(default_factory=dict)

    def realize(self, name: str) -> torch.Tensor:
        """The parameter's values in the dtype transformers would have loaded it in."""
        first = self.owner.get(name)
        if first is None:
            raise ExportError(f"the checkpoint holds no weight for {name!r}")
        value = self._pending.pop(name, None)
        if value is None:
            self._pending.clear()
            made = {key: v[0] if isinstance(v, list) else v for key, v in self._convert(first).items()}
            value = made.pop(name, None)
            if value is None:
                raise ExportError(f"the checkpoint's conversion for {first!r} did not produce {name!r}")
            self._pending = {key: v for key, v in made.items() if key in self.owner}
        expected = self.model.get_parameter_or_buffer(name).shape
        if value.shape != expected:
            raise ExportError(f"the checkpoint's {name!r} has shape {list(value.shape)}; "
                              f"the model's config expects {list(expected)}")
        return value

    def _convert(self, first: str) -> dict:
        from transformers.core_model_loading import _materialize_copy

        group = self.groups[first]
        mapping = copy.deepcopy(group.template)
        for renamed_key, original_key, pattern, tensor, dtype in group.entries:
            mapping.add_tensor(renamed_key, original_key, pattern,
                               functools.partial(_materialize_copy, tensor, "cpu", dtype))
        try:
            with torch.no_grad():
                return mapping.convert(first, model=self.model, config=self.model.config,
                                       hf_quantizer=self.hf_quantizer, loading_info=self.info)
        except ExportError:
            raise
        except Exception as exc:  # conversion ops raise many types; name the weight
            raise ExportError(f"could not read {first!r} from the checkpoint: {exc}") from exc


def _plan_loading(plan: LoadPlan, model, state_dict: dict, load_config, disk_offload_index=None):
    """Stands in for ``convert_and_load_state_dict_in_model``: groups as it does, loads nothing.

    Follows transformers 5's loader step for step (renamings, then at most one converter
    per key; the dtype rules of ``dtype_plan`` and of pre-quantized checkpoints), so that
    ``LoadPlan.realize`` later gives each parameter exactly the value it would have had.
    """
    from transformers.core_model_loading import (
        WeightConverter,
        WeightRenaming,
        build_glob_alternation,
        dot_natural_key,
        rename_source_key,
        set_param_for_module,
    )
    from transformers.utils.loading_report import LoadStateDictInfo

    hf_quantizer = load_config.hf_quantizer
    method = getattr(getattr(hf_quantizer, "quantization_config", None), "quant_method", None)
    if hf_quantizer is not None and str(getattr(method, "value", method)) != "gguf":
        raise NotStreamable(f"its weights are quantized by a library ({getattr(method, 'value', method)})")
    if load_config.device_map and any(str(d) not in ("cpu", "meta") for d in load_config.device_map.values()):
        raise NotStreamable("a device map places weights off the CPU")
    dtype = load_config.dtype
    dtype_plan = load_config.dtype_plan or {}
    weight_mapping = load_config.weight_mapping or []
    meta_state = model.state_dict()
    buffers = {name for name, _ in model.named_buffers()}
    info = LoadStateDictInfo(missing_keys=set(meta_state), unexpected_keys=set(), mismatched_keys=set(),
                             conversion_errors={}, error_msgs=[], skipped_pp_keys=set())
    renamings = [entry for entry in weight_mapping if isinstance(entry, WeightRenaming)]
    converters = [entry for entry in weight_mapping if isinstance(entry, WeightConverter)]
    pattern_to_converter = {k: converter for converter in converters for k in converter.source_patterns}
    if dtype_plan:
        dtype_alternation, dtype_by_group, _ = build_glob_alternation(list(dtype_plan))

    for original_key, tensor in sorted(state_dict.items(), key=lambda kv: dot_natural_key(kv[0])):
        renamed_key, source_pattern = rename_source_key(original_key, renamings, converters,
                                                        model.base_model_prefix, meta_state)
        if renamed_key not in meta_state and original_key in meta_state:
            renamed_key, source_pattern = rename_source_key(
                original_key, [], [], base_model_prefix=model.base_model_prefix, meta_state_dict=meta_state)
        if renamed_key not in meta_state:
            info.unexpected_keys.add(renamed_key)
            continue
        group = plan.groups.get(renamed_key)
        if group is None:
            template = (copy.deepcopy(pattern_to_converter[source_pattern]) if source_pattern is not None
                        else WeightRenaming(original_key, renamed_key))
            group = plan.groups[renamed_key] = _Group(template)
        if source_pattern is None:
            source_pattern = original_key
        target_dtype = dtype
        empty = meta_state[renamed_key]
        if dtype_plan and dtype_alternation.search(renamed_key):
            matched = dtype_alternation.search(renamed_key)
            target_dtype = dtype_plan[dtype_by_group[matched.lastgroup]]
        elif empty.dtype != target_dtype:
            target_dtype = empty.dtype
        if hf_quantizer is not None and hf_quantizer.pre_quantized:
            target_dtype = hf_quantizer.get_new_dtype(group.template, tensor, target_dtype)
        if isinstance(group.template, WeightRenaming) and hasattr(tensor, "get_shape"):
            _check_shape(renamed_key, original_key, list(tensor.get_shape()), list(empty.shape))
        group.entries.append((renamed_key, original_key, source_pattern, tensor, target_dtype))

    plan.model, plan.hf_quantizer, plan.info = model, hf_quantizer, info
    for first, group in plan.groups.items():
        patterns = group.template.target_patterns
        group.targets = [first] if len(patterns) < 2 else [first.replace(patterns[0], p, 1) for p in patterns]
        for target in group.targets:
            plan.owner[target] = first
    for first, group in list(plan.groups.items()):
        if not any(target in buffers for target in group.targets):
            continue
        # A buffer stored in the checkpoint (rare, and small): load it as transformers would.
        values = plan._convert(first)
        for target, value in values.items():
            set_param_for_module(model, target, value[0] if isinstance(value, list) else value, info, hf_quantizer)
            plan.owner.pop(target, None)
        del plan.groups[first]
    for target in plan.owner:
        info.missing_keys.discard(target)
        param = model.get_parameter_or_buffer(target)
        param._is_hf_initialized = True
    return info, disk_offload_index


def _check_shape(name: str, stored_name: str, stored: list[int], expected: list[int]) -> None:
    """A checkpoint tensor renamed as is must have its parameter's shape (checked before any weight is read)."""
    if stored != expected:
        raise ExportError(f"the checkpoint's {stored_name!r} has shape {stored}; the model's config expects "
                          f"{expected} for {name!r}")


# ----------------------------------------------------------------------------- GGUF, read lazily


class _GgufTensorReader:
    """One tensor of a GGUF file, read with pread when asked (transformers' legacy GGUF path)."""

    def __init__(self, path: str, tensor, processor, key_map: dict, torch_dtype: torch.dtype | None):
        self.path = path
        self.name = tensor.name
        self.tensor_type = tensor.tensor_type
        self.offset = int(tensor.data_offset)
        self.nbytes = int(tensor.n_bytes)
        self.data_dtype = tensor.data.dtype  # metadata of the reader's memory map; no page is read
        self.data_shape = tuple(tensor.data.shape)
        self.shape = tuple(int(d) for d in reversed(tensor.shape))  # ggml stores dimensions fastest first
        self.processor = processor
        self.key_map = key_map
        self.torch_dtype = torch_dtype

    def raw(self) -> np.ndarray:
        """The tensor's bytes as ``GGUFReader`` presents them (blocks or values)."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            data = os.pread(fd, self.nbytes, self.offset)
        finally:
            os.close(fd)
        if len(data) != self.nbytes:
            raise ExportError(f"{self.path} is truncated: tensor {self.name} ends past the end of the file")
        return np.frombuffer(data, dtype=self.data_dtype).reshape(self.data_shape)

    def processed(self, weights: np.ndarray) -> np.ndarray:
        result = self.processor.process(weights=weights, name=self.name, tensor_key_mapping=self.key_map,
                                        parsed_parameters={"tensors": {}})
        if result.name != self.name:
            raise ExportError(f"internal: transformers' GGUF processor renamed {self.name} to {result.name}")
        return result.weights

    def is_floating_point(self) -> bool:
        return True  # transformers dequantizes every GGUF tensor to floats

    def __getitem__(self, _index) -> torch.Tensor:
        from gguf import dequantize

        tensor = torch.from_numpy(np.copy(self.processed(dequantize(self.raw(), self.tensor_type))))
        return tensor.to(self.torch_dtype) if self.torch_dtype is not None else tensor


def _legacy_gguf_state_dict(path: str, model, torch_dtype) -> dict:
    """``load_gguf_checkpoint(..., return_tensors=True)`` with every tensor read when asked for."""
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
        read_field,
    )

    parsed = load_gguf_checkpoint(path, return_tensors=False)
    reader = GGUFReader(path)
    architecture = read_field(reader, "general.architecture")[0]
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed.get("config", {}))
    if type(processor).__name__ not in NAME_KEEPING_PROCESSORS:
        raise NotStreamable(f"transformers merges {architecture} GGUF tensors while loading them")
    key_map = get_gguf_hf_weights_map(model, processor)
    state = {}
    for tensor in reader.tensors:
        if tensor.name in key_map:
            state[key_map[tensor.name]] = _GgufTensorReader(path, tensor, processor, key_map, torch_dtype)
    return state


class _PreadGgufTensor:
    """transformers' ``LazyGgufTensor`` (its newer GGUF path) with pread instead of a memory map."""

    def __init__(self, lazy, path: str, start: int):
        self.lazy, self.path, self.start = lazy, path, start

    def __getitem__(self, index) -> torch.Tensor:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            data = os.pread(fd, self.lazy.data.nbytes, self.start)
        finally:
            os.close(fd)
        reread = copy.copy(self.lazy)
        reread.data = np.frombuffer(data, dtype=np.uint8)
        return reread[index]


# ----------------------------------------------------------------------------- loading


@contextlib.contextmanager
def _planning(plan: LoadPlan) -> Iterator[None]:
    """Swap transformers' weight loading for planning (see the module docstring), then restore it."""
    from transformers import modeling_utils
    from transformers.quantizers import quantizer_gguf

    from exporter.pread import SafetensorsFile

    original_convert = modeling_utils.convert_and_load_state_dict_in_model
    original_safe_open = modeling_utils.safe_open
    original_state_dict = quantizer_gguf.GgufHfQuantizer.get_state_dict

    def gguf_state_dict(quantizer, checkpoint_file, model):
        if not quantizer.supported:
            return _legacy_gguf_state_dict(checkpoint_file, model, quantizer.dtype)
        from transformers.integrations.gguf.reader import load_gguf_state_dict

        header = quantizer.header
        lazy = load_gguf_state_dict(header)
        starts = {info.name: header.data_start + info.offset for info in header.tensors}
        return {name: _PreadGgufTensor(item, header.path, starts[name]) for name, item in lazy.items()}

    modeling_utils.convert_and_load_state_dict_in_model = functools.partial(_plan_loading, plan)
    modeling_utils.safe_open = SafetensorsFile
    quantizer_gguf.GgufHfQuantizer.get_state_dict = gguf_state_dict
    try:
        yield
    finally:
        modeling_utils.convert_and_load_state_dict_in_model = original_convert
        modeling_utils.safe_open = original_safe_open
        quantizer_gguf.GgufHfQuantizer.get_state_dict = original_state_dict


@dataclass
class CheckpointWeights:
    """The weights of a model loaded without them: lazy consts for the export, read from the checkpoint."""

    plan: LoadPlan
    aliases: dict[str, list[str]]  # parameter name -> every name of the same (tied) parameter
    #: ids of the placeholder tensors capture ran on: their memory holds no values
    placeholder_ids: set[int] = field(default_factory=set)

    def const_source(self, state_name: str, tensor: torch.Tensor):
        """``lower``'s const source: planned parameters become lazy reads, everything else stays as is."""
        name = self.parameter_name(state_name)
        if name is None:
            if tensor.is_meta or id(tensor) in self.placeholder_ids:
                raise ExportError(f"no weight for {state_name.removeprefix('model.')!r} in the checkpoint")
            return tensor.detach()
        dtype = tensor.dtype

        def read() -> torch.Tensor:
            value = self.plan.realize(name)
            return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value

        return LazyTensor(tensor.shape, dtype, read)

    def parameter_name(self, state_name: str) -> str | None:
        """The planned parameter behind a state name of the exported program (``model.`` + its name)."""
        name = state_name.removeprefix("model.")
        for candidate in self.aliases.get(name, [name]):
            if candidate in self.plan.owner:
                return candidate
        return None

    def gguf_types(self) -> dict[str, int]:
        """How many planned parameters the GGUF file stores in each ggml type (name -> count)."""
        counts: dict[str, int] = {}
        for group in self.plan.groups.values():
            for entry in group.entries:
                if isinstance(entry[3], _GgufTensorReader):
                    kind = getattr(entry[3].tensor_type, "name", str(entry[3].tensor_type))
                    counts[kind] = counts.get(kind, 0) + 1
        return counts

    def gguf_tensor(self, name: str):
        """The GGUF tensor a parameter is read from (for kept quants), or None."""
        for candidate in self.aliases.get(name, [name]):
            group = self.plan.groups.get(self.plan.owner.get(candidate, ""))
            if group is None or len(group.entries) != 1 or type(group.template).__name__ != "WeightRenaming":
                continue
            reader = group.entries[0][3]
            if isinstance(reader, _GgufTensorReader):
                return reader
        return None

    @contextlib.contextmanager
    def placeholders(self, model: torch.nn.Module) -> Iterator[None]:
        """Give every meta parameter an untouched CPU tensor for capture (no page is written, none resident).

        torch.export reads shapes, dtypes and strides, never values; tied parameters stay one object.
        """
        swapped: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
        made: dict[int, torch.nn.Parameter] = {}
        for module in model.modules():
            for key, param in list(module._parameters.items()):
                if param is None or not param.is_meta:
                    continue
                if id(param) not in made:
                    made[id(param)] = torch.nn.Parameter(torch.empty(param.shape, dtype=param.dtype),
                                                         requires_grad=False)
                    self.placeholder_ids.add(id(made[id(param)]))
                swapped.append((module, key, param))
                module._parameters[key] = made[id(param)]
        try:
            yield
        finally:
            for module, key, param in swapped:
                module._parameters[key] = param


def load_streaming(location: str, dtype: torch.dtype, model_class=None, **kwargs):
    """(model with its weights on the meta device, CheckpointWeights) through ``from_pretrained``.

    ``model_class``: the class to load (default ``AutoModelForCausalLM``); ``kwargs`` go to
    ``from_pretrained`` (``gguf_file``, ``use_safetensors``, ``config``). Raises
    ``NotStreamable`` for a source that has to be loaded whole.
    """
    from transformers import AutoModelForCausalLM

    plan = LoadPlan()
    with _planning(plan):
        model = (model_class or AutoModelForCausalLM).from_pretrained(location, dtype=dtype, **kwargs)
    if not plan.owner:
        raise NotStreamable("its loader read no tensor lazily")
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    by_name = {name: names for names in aliases.values() for name in names}
    return model, CheckpointWeights(plan, by_name)
