"""Kernel argument structs, defined once for both sides.

Each kernel takes one struct by value. It is declared here as (C type, name) pairs; the
ctypes class packs it on the host and `c_struct` renders the identical C++ declaration into
the generated source, with a static_assert on its size, so the two layouts cannot drift.
Pointers are typed on the C++ side and plain addresses (ints) on the host side.
"""
from __future__ import annotations

import ctypes

_SCALARS = {
    "int": ctypes.c_int32, "int32_t": ctypes.c_int32, "uint32_t": ctypes.c_uint32,
    "int64_t": ctypes.c_int64, "uint64_t": ctypes.c_uint64, "float": ctypes.c_float,
    "unsigned long long": ctypes.c_uint64,
}


def _ctype(c_type: str):
    if c_type.rstrip().endswith("*"):
        return ctypes.c_uint64      # device address; 8 bytes, 8-aligned like a pointer
    return _SCALARS[c_type]


def struct(name: str, *fields: tuple[str, str]) -> type[ctypes.Structure]:
    cls = type(name, (ctypes.Structure,), {
        "_fields_": [(fname, _ctype(ctype)) for ctype, fname in fields],
        "_c_fields_": tuple(fields),
    })
    return cls


def c_struct(cls: type[ctypes.Structure]) -> str:
    body = "\n".join(f"    {ctype} {fname};" for ctype, fname in cls._c_fields_)
    return (f"struct {cls.__name__} {{\n{body}\n}};\n"
            f"static_assert(sizeof({cls.__name__}) == {ctypes.sizeof(cls)}, "
            f"\"host/device layout of {cls.__name__} differs\");\n")


# Fields every communicating kernel shares: where to report errors and when to give up.
ERROR_FIELDS = (
    ("int*", "error_word"),           # mapped pinned host memory (runtime/errors.py)
    ("unsigned long long", "timeout_ns"),   # each wait gives up this long after kernel start
    ("int", "rank"),
    ("int", "op"),                    # operation code, for the error message
)

# ---------------------------------------------------------------------------- layout
LayoutArgs = struct(
    "LayoutArgs",
    ("const int64_t*", "topk_idx"),         # [T, K]
    ("int*", "num_tokens_per_rank"),        # [R]   zeroed by the host (torch.zeros)
    ("int*", "num_tokens_per_expert"),      # [E]   zeroed by the host
    ("bool*", "is_token_in_rank"),          # [T, R]
    ("int", "num_tokens"),
    ("int", "pad0"),
    *ERROR_FIELDS,
)

ARGS: dict[str, type[ctypes.Structure]] = {
    "layout": LayoutArgs,
}
