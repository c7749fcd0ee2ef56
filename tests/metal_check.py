"""A Metal kernel body as MLX wraps it, and a compile check that keeps its address spaces apart.

``wrap_kernel`` writes the source ``mx.fast.metal_kernel`` compiles for a body, a header
and a call's inputs, exactly as MLX 0.32 does (``write_signature`` and the kernel name
in mlx/backend/common/metal_kernel.cpp): each input is ``const device T*``, or
``const constant T*`` when it has fewer than 8 elements (``&`` for a scalar), outputs
are ``device T*``, the Metal attributes the body names become parameters, and a
template kernel is instantiated by name.

``address_space_errors`` compiles that source with libclang (the ``libclang`` wheel of
the dev extra) as C++, with ``device``, ``constant`` and ``threadgroup`` defined as
distinct ``__attribute__((address_space(N)))`` and the Metal types and functions the
kernels use declared in a small prelude, so a ``const device T*`` that points at a
``constant`` input is a compile error here as it is on a Mac. g++ through
interp/kernels/metal_shim.h cannot see it: it defines the address spaces away.
"""

from __future__ import annotations

import re
from functools import cache

#: Inputs with fewer elements are passed in the constant address space (MLX 0.32).
MAX_CONSTANT_ARRAY_SIZE = 8

#: Metal attributes MLX adds as kernel parameters when the body names them.
METAL_ATTRIBUTES = {
    "dispatch_quadgroups_per_threadgroup": "uint", "dispatch_simdgroups_per_threadgroup": "uint",
    "dispatch_threads_per_threadgroup": "uint3", "grid_origin": "uint3", "grid_size": "uint3",
    "quadgroup_index_in_threadgroup": "uint", "quadgroups_per_threadgroup": "uint",
    "simdgroup_index_in_threadgroup": "uint", "simdgroups_per_threadgroup": "uint",
    "thread_execution_width": "uint", "thread_index_in_quadgroup": "uint", "thread_index_in_simdgroup": "uint",
    "thread_index_in_threadgroup": "uint", "thread_position_in_grid": "uint3",
    "thread_position_in_threadgroup": "uint3", "threadgroup_position_in_grid": "uint3",
    "threadgroups_per_grid": "uint3", "threads_per_grid": "uint3", "threads_per_simdgroup": "uint",
    "threads_per_threadgroup": "uint3",
}

#: MLX's ``get_type_string``: the Metal spelling of each dtype.
TYPE_NAMES = {
    "float32": "float", "float16": "float16_t", "bfloat16": "bfloat16_t", "float64": "double",
    "complex64": "complex64_t", "bool": "bool", "int8": "int8_t", "int16": "int16_t", "int32": "int32_t",
    "int64": "int64_t", "uint8": "uint8_t", "uint16": "uint16_t", "uint32": "uint32_t", "uint64": "uint64_t",
}


def type_name(dtype) -> str:
    """MLX's Metal type string for an ``mx.Dtype``."""
    return TYPE_NAMES[str(dtype).removeprefix("mlx.core.")]


def _template_value(value) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    return type_name(value)


def kernel_name(name: str, inputs: list, output_dtypes: list, template: list) -> str:
    """The host name MLX gives one instantiation (dtypes and constant-ness of the inputs in it)."""
    full = "custom_kernel_" + name
    if template:
        definition = "<" + ", ".join(_template_value(v) for _, v in template) + ">"
        hashed = definition.replace("<", "_").replace(">", "_").replace(", ", "_")[:-1]
        full += "_" + hashed
    for arr in inputs:
        full += "_" + type_name(arr.dtype)
        if arr.ndim == 0:
            full += "s"
        elif arr.size < MAX_CONSTANT_ARRAY_SIZE:
            full += "c"
    for dtype in output_dtypes:
        full += "_" + type_name(dtype)
    return full


def wrap_kernel(name: str, input_names: list[str], output_names: list[str], source: str, header: str,
                inputs: list, output_dtypes: list, template: list, atomic_outputs: bool = False) -> str:
    """The complete Metal source MLX 0.32 compiles for this body, header and call."""
    full_name = kernel_name(name, inputs, output_dtypes, template)
    params = []
    for input_name, arr in zip(input_names, inputs, strict=True):
        location = "constant" if arr.size < MAX_CONSTANT_ARRAY_SIZE else "device"
        ref = "&" if arr.ndim == 0 else "*"
        params.append(f"  const {location} {type_name(arr.dtype)}{ref} {input_name} [[buffer({len(params)})]]")
        if arr.ndim > 0:
            for suffix, kind in (("_shape", "const constant int*"), ("_strides", "const constant int64_t*"),
                                 ("_ndim", "const constant int&")):
                if input_name + suffix in source:
                    params.append(f"  {kind} {input_name}{suffix} [[buffer({len(params)})]]")
    for output_name, dtype in zip(output_names, output_dtypes, strict=True):
        element = f"atomic<{type_name(dtype)}>" if atomic_outputs else type_name(dtype)
        params.append(f"  device {element}* {output_name} [[buffer({len(params)})]]")
    params += [f"  {kind} {attr} [[{attr}]]" for attr, kind in METAL_ATTRIBUTES.items() if attr in source]
    text = header
    if template:
        kinds = ["bool" if isinstance(v, bool) else "int" if isinstance(v, int) else "typename" for _, v in template]
        text += "template <" + ", ".join(f"{k} {n}" for k, (n, _) in zip(kinds, template, strict=True)) + ">\n"
    text += f"[[kernel]] void {full_name}(\n" + ",\n".join(params) + ") {\n" + source + "\n}\n"
    if template:
        instance = full_name + "<" + ", ".join(_template_value(v) for _, v in template) + ">"
        text += f'\ntemplate [[host_name("{full_name}")]] [[kernel]] decltype({instance}) {instance};\n'
    return text


#: What Metal's standard library and MLX's kernel utilities give a kernel, as far as
#: paw's kernels use it, in C++ that clang checks with the address spaces kept apart.
METAL_PRELUDE = r"""
#define device __attribute__((address_space(1)))
#define constant __attribute__((address_space(2)))
#define threadgroup __attribute__((address_space(3)))
#define thread
typedef unsigned char uint8_t; typedef unsigned short uint16_t; typedef unsigned int uint32_t;
typedef unsigned long uint64_t; typedef signed char int8_t; typedef short int16_t; typedef int int32_t;
typedef long int64_t; typedef unsigned long size_t; typedef unsigned int uint;
typedef _Float16 half;
typedef half float16_t;
typedef __bf16 bfloat16_t;  // Metal 3.1's bfloat: an arithmetic type, as clang's __bf16
typedef float float2 __attribute__((ext_vector_type(2)));
typedef float float4 __attribute__((ext_vector_type(4)));
typedef half half2 __attribute__((ext_vector_type(2)));
typedef half half4 __attribute__((ext_vector_type(4)));
typedef bfloat16_t bfloat4 __attribute__((ext_vector_type(4)));
typedef uint uint2 __attribute__((ext_vector_type(2)));
typedef uint uint4 __attribute__((ext_vector_type(4)));
struct uint3 { uint x, y, z; };
float simd_sum(float);
template <typename T> T min(T, T);
template <typename T> T max(T, T);
"""
#: Lines of METAL_PRELUDE before the kernel source, to report the kernel's own line numbers.
_PRELUDE_LINES = METAL_PRELUDE.count("\n")
_ATTRIBUTE = re.compile(r"\[\[[^\[\]]*\]\]")  # [[kernel]], [[buffer(0)]], ...: no address spaces in them


@cache
def address_space_errors(metal_source: str) -> tuple[str, ...]:
    """Compile errors of ``metal_source`` (a whole kernel, as ``wrap_kernel`` writes it) with
    distinct address spaces; empty when it compiles. Line numbers count from the source's first line."""
    import clang.cindex as cindex

    text = METAL_PRELUDE + _ATTRIBUTE.sub("", metal_source)
    unit = cindex.Index.create().parse(
        "kernel.cpp", args=["-x", "c++", "-std=c++17", "-fsyntax-only", "-nostdinc", "-ffreestanding"],
        unsaved_files=[("kernel.cpp", text)])
    errors = []
    for diagnostic in unit.diagnostics:
        if diagnostic.severity >= cindex.Diagnostic.Error:
            line = diagnostic.location.line - _PRELUDE_LINES
            errors.append(f"line {line}: {diagnostic.spelling}")
    return tuple(errors)
