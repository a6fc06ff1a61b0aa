"""Spec file (YAML) -> the exact set of kernel specs those runs need. Never a traceback: every
problem is a SpecFileError naming the file, the key and what was expected.

    arch: sm_90                      # optional; --arch and EPGEN_ARCH win over it
    models:
      - name: deepseek-v3
        hidden: 7168
        num_experts: 256
        num_topk: 8
        ep_sizes: [2, 4, 8, 16]
        ranks_per_node: 8            # optional: GPUs per node; a larger ep_size spans nodes
        modes:
          normal: {dtypes: [bf16, fp8]}
          low_latency: {dispatch_dtypes: [fp8, bf16]}    # also combine_dtypes: [bf16, logfmt10]
                                                          # and recv_scale_layouts: [deepgemm]
    kernels:                         # optional explicit specs (the fields of epgen/jit/specs.py)
      - {family: normal_combine, hidden: 2880, num_topk: 4, num_ranks: 4, num_biases: 1}
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import yaml

from . import formats
from .jit.specs import (FAMILIES, KernelSpec, SpecError, internode_combine_spec,
                        internode_dispatch_spec, internode_notify_spec, layout_spec,
                        ll_barrier_spec, ll_combine_spec, ll_dispatch_spec, normal_combine_spec,
                        normal_dispatch_rows_spec)
from .variants import combine_variant, internode_warps_per_block

ECHO_CHARS = 80          # a value shown in an error is cut to this many characters


class SpecFileError(ValueError):
    """A spec file that cannot be read: names the file, the key and what was expected."""


def echo(v) -> str:
    text = repr(v)
    return text if len(text) <= ECHO_CHARS else text[:ECHO_CHARS] + f"... ({len(text)} chars)"


def _fail(path: str, where: str, expected: str, got=dataclasses.MISSING):
    got_txt = "" if got is dataclasses.MISSING else f", got {type(got).__name__} {echo(got)}"
    raise SpecFileError(f"{path}: {where}: expected {expected}{got_txt}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _mapping(v, path, where, what) -> dict:
    if not isinstance(v, dict):
        _fail(path, where, what, v)
    return v


def _check_keys(d: dict, allowed, path: str, where: str) -> None:
    unknown = [k for k in d if k not in allowed]
    if unknown:
        raise SpecFileError(f"{path}: {where}: unknown key(s) {echo(sorted(map(str, unknown)))}; "
                            f"the keys are {sorted(allowed)}")


def _int_list(v, path, where) -> list[int]:
    if not (isinstance(v, list) and v and all(_is_int(x) for x in v)):
        _fail(path, where, "a non-empty list of ints", v)
    return v


def _format_of(dtype: str) -> formats.WireFormat:
    """"fp8" is DeepEP's FP8 (float32 per-128 scales); any other dtype a wire-format name."""
    return formats.get("fp8_e4m3_f32_128" if dtype == "fp8" else dtype)


def _dtype_list(v, path, where, low_latency=False) -> list[str]:
    """A dtype is "bf16", "fp8" (e4m3 with float32 per-128 scales) or a wire-format name
    (epgen.formats, README "Wire formats"): normal mode any of them, "opaque<row bytes>[+<side
    bytes>]" included; low latency the ones its dispatch sends (opaque rows included)."""
    allowed = ["fp8", *(formats.LOW_LATENCY if low_latency else formats.FORMATS),
               "opaque<row>[+<side>]"]
    if not (isinstance(v, list) and v):
        _fail(path, where, f"a non-empty list of {allowed}", v)
    for x in v:
        try:
            fmt = _format_of(x) if isinstance(x, str) else None
        except formats.FormatError:
            fmt = None
        if fmt is None or (low_latency and fmt.name not in formats.LOW_LATENCY
                           and fmt.packing != "bytes"):
            raise SpecFileError(f"{path}: {where}: {echo(x)} is not one of {allowed}")
    return v


# What each mode asks the JIT for at run time: the ops' own builders (specs.py), at the
# file's shapes.
def normal_mode_specs(hidden, num_experts, num_topk, num_ranks, dtypes,
                      ranks_per_node=None) -> list[KernelSpec]:
    """ranks_per_node: the GPUs of a node; num_ranks above it spans nodes (the internode
    kernels, ops/internode.py), None or at least num_ranks one node (the intranode ones)."""
    if ranks_per_node is not None and ranks_per_node < num_ranks:
        return internode_mode_specs(hidden, num_experts, num_topk, num_ranks, dtypes,
                                    ranks_per_node)
    out: list[KernelSpec] = [layout_spec(num_ranks, num_experts, num_topk)]
    for dtype in dtypes:
        fmt = _format_of(dtype)
        # with top-k, and cached (an uncached dispatch without top-k, rare in models, is
        # (hidden, 0, num_experts): list it as an explicit kernel where a run needs it)
        for k, e in ((num_topk, num_experts), (0, None)):
            out.append(normal_dispatch_rows_spec(fmt.data_bytes(hidden), fmt.scale_cols(hidden),
                                                 k, e, num_ranks))
    for k in (num_topk, 0):
        out.append(normal_combine_spec(hidden, k, num_ranks))
    return out


def internode_mode_specs(hidden, num_experts, num_topk, num_ranks, dtypes,
                         ranks_per_node) -> list[KernelSpec]:
    """Normal mode across nodes: the layout (with its per-node counts), the counts exchange
    (and its form on dummy counts, the barrier before a ring-layout change), dispatch with top-k and cached (no top-k),
    combine with and without weights; the warps per block the calls will read
    (EPGEN_INTERNODE_WARPS_PER_BLOCK)."""
    L, warps = ranks_per_node, internode_warps_per_block()
    out: list[KernelSpec] = [layout_spec(num_ranks, num_experts, num_topk, L),
                             internode_notify_spec(num_ranks, L, num_experts),
                             # the barrier before a ring-layout change: one expert per rank
                             internode_notify_spec(num_ranks, L, num_ranks)]
    for dtype in dtypes:
        fmt = _format_of(dtype)
        for k in (num_topk, 0):
            out.append(internode_dispatch_spec(fmt.data_bytes(hidden), fmt.scale_cols(hidden),
                                               k, num_ranks, L, warps))
    for k in (num_topk, 0):
        out.append(internode_combine_spec(hidden, k, num_ranks, L, warps_per_block=warps))
    return out


def _name_list(v, allowed, path, where) -> list[str]:
    if not (isinstance(v, list) and v and all(isinstance(x, str) for x in v)):
        _fail(path, where, f"a non-empty list of {list(allowed)}", v)
    for x in v:
        if x not in allowed:
            raise SpecFileError(f"{path}: {where}: {echo(x)} is not one of {list(allowed)}")
    return v


def low_latency_specs(hidden, num_experts, num_topk, num_ranks, dtypes, combine_dtypes=("bf16",),
                      recv_scale_layouts=("deepep",)) -> list[KernelSpec]:
    """dtypes: the dispatch formats; combine_dtypes: formats.COMBINE_FORMATS; recv_scale_layouts:
    formats.RECV_SCALE_LAYOUTS, each for the dispatch formats that have it (README "Wire
    formats"). The combine always includes BF16's kernel (DeepEP's default)."""
    out: list[KernelSpec] = []
    for dtype in dtypes:
        fmt = _format_of(dtype)
        for layout in recv_scale_layouts:
            if layout == "deepep" or fmt.name in formats.RECV_SCALE_LAYOUTS[layout]:
                out.append(ll_dispatch_spec(hidden, num_topk, num_experts, num_ranks,
                                            **formats.low_latency_fields(fmt),
                                            **formats.recv_scale_layout_field(
                                                fmt, None if layout == "deepep" else layout)))
    out.append(ll_combine_spec(hidden, num_topk, num_experts, num_ranks))
    for name in combine_dtypes:
        if name != formats.BF16.name:       # the other formats run the per-expert kernel only
            out.append(ll_combine_spec(hidden, num_topk, num_experts, num_ranks,
                                       **formats.combine_fields(name)))
    if combine_variant() == "per_rank":              # the per-rank kernel, where it is selected
        out.append(ll_combine_spec(hidden, num_topk, num_experts, num_ranks, per_rank=True))
    out.append(ll_barrier_spec(num_ranks))     # clean_low_latency_buffer
    return out


@dataclass
class SpecFile:
    path: str
    arch: str | None
    specs: list[KernelSpec]


def _read(path: str):
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise SpecFileError(f"{path}: cannot read ({e.strerror})") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecFileError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset "
                            f"{e.start}); save it as UTF-8") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark else ""
        raise SpecFileError(f"{path}: {line}invalid YAML ({getattr(e, 'problem', None) or e})") \
            from None
    except RecursionError:
        raise SpecFileError(f"{path}: nested too deeply to be a spec file") from None


def _model_specs(m, path: str, where: str) -> list[KernelSpec]:
    m = _mapping(m, path, where, "a mapping with hidden, num_experts, num_topk, ep_sizes, modes")
    _check_keys(m, {"name", "hidden", "num_experts", "num_topk", "ep_sizes", "ranks_per_node",
                    "modes"}, path, where)
    if "name" in m and not isinstance(m["name"], str):
        _fail(path, f"{where}.name", "a string", m["name"])
    for key in ("hidden", "num_experts", "num_topk"):
        if not _is_int(m.get(key)):
            _fail(path, f"{where}.{key}", "an int", m.get(key))
    ep_sizes = _int_list(m.get("ep_sizes"), path, f"{where}.ep_sizes")
    ranks_per_node = m.get("ranks_per_node")
    if ranks_per_node is not None and not (_is_int(ranks_per_node) and ranks_per_node >= 1):
        _fail(path, f"{where}.ranks_per_node", "a positive int (the GPUs of a node)",
              ranks_per_node)
    modes = m.get("modes")
    if not (isinstance(modes, dict) and modes):
        _fail(path, f"{where}.modes", "a mapping with 'normal' and/or 'low_latency'", modes)
    _check_keys(modes, {"normal", "low_latency"}, path, f"{where}.modes")
    normal = low = None
    if "normal" in modes:
        w = f"{where}.modes.normal"
        mode = _mapping(modes["normal"] or {}, path, w, "a mapping (or nothing)")
        _check_keys(mode, {"dtypes"}, path, w)
        normal = _dtype_list(mode.get("dtypes", ["bf16"]), path, f"{w}.dtypes")
    if "low_latency" in modes:
        w = f"{where}.modes.low_latency"
        mode = _mapping(modes["low_latency"] or {}, path, w, "a mapping (or nothing)")
        if "num_max_dispatch_tokens_per_rank" in mode:
            raise SpecFileError(
                f"{path}: {w}.num_max_dispatch_tokens_per_rank: no kernel depends on it (it is "
                "a run-time argument of low_latency_dispatch, up to 1024): remove it")
        _check_keys(mode, {"dispatch_dtypes", "combine_dtypes", "recv_scale_layouts"}, path, w)
        low = _dtype_list(mode.get("dispatch_dtypes", ["fp8"]), path, f"{w}.dispatch_dtypes",
                          low_latency=True)
        low_combine = _name_list(mode.get("combine_dtypes", ["bf16"]), formats.COMBINE_FORMATS,
                                 path, f"{w}.combine_dtypes")
        layouts = _name_list(mode.get("recv_scale_layouts", ["deepep"]),
                             formats.RECV_SCALE_LAYOUTS, path, f"{w}.recv_scale_layouts")
        for layout in layouts:
            if layout != "deepep" and not any(_format_of(d).name in formats.RECV_SCALE_LAYOUTS[layout] for d in low):
                raise SpecFileError(
                    f"{path}: {w}.recv_scale_layouts: {layout!r} is a layout of "
                    f"{formats.RECV_SCALE_LAYOUTS[layout]}, none of the dispatch_dtypes {low}")
    specs: list[KernelSpec] = []
    for ep in ep_sizes:
        try:
            if normal:
                specs += normal_mode_specs(m["hidden"], m["num_experts"], m["num_topk"], ep, normal,
                                           ranks_per_node)
            if low:
                specs += low_latency_specs(m["hidden"], m["num_experts"], m["num_topk"], ep, low,
                                           low_combine, layouts)
        except (SpecError, formats.FormatError) as e:
            raise SpecFileError(f"{path}: {where} (ep_size {ep}): {e}") from None
    return specs


def _kernel_spec(k, path: str, where: str) -> KernelSpec:
    k = _mapping(k, path, where, "a mapping with 'family' and that family's fields")
    family = k.get("family")
    if not (isinstance(family, str) and family in FAMILIES):
        _fail(path, f"{where}.family", f"one of {sorted(FAMILIES)}", family)
    cls = FAMILIES[family]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _check_keys(k, {"family", *fields}, path, where)
    missing = [n for n, f in fields.items() if f.default is dataclasses.MISSING and n not in k]
    if missing:
        raise SpecFileError(f"{path}: {where}: family {family} needs {missing}")
    values = {}
    for name, v in k.items():
        if name == "family":
            continue
        if fields[name].type in ("bool", bool) and _is_int(v) and v in (0, 1):
            v = bool(v)          # 0 / 1 mean what they say; so do false / true
        values[name] = v
    try:
        return cls(**values)
    except SpecError as e:
        raise SpecFileError(f"{path}: {where}: {e}") from None


def load_spec_file(path: str) -> SpecFile:
    data = _read(path)
    data = _mapping(data, path, "top level", "a mapping with 'models' and/or 'kernels'")
    _check_keys(data, {"arch", "models", "kernels"}, path, "top level")
    if "models" not in data and "kernels" not in data:
        _fail(path, "top level", "at least one of 'models' or 'kernels'")
    arch = data.get("arch")
    if arch is not None:
        from .jit.toolchain import check_arch
        try:
            check_arch(f"{path}: arch", arch)
        except ValueError as e:
            raise SpecFileError(str(e)) from None
    specs: list[KernelSpec] = []
    for key, expand in (("models", _model_specs), ("kernels", _kernel_spec)):
        items = data.get(key) or []
        if not isinstance(items, list):
            _fail(path, key, "a list", items)
        for i, item in enumerate(items):
            got = expand(item, path, f"{key}[{i}]")
            specs += got if isinstance(got, list) else [got]
    unique = list(dict.fromkeys(specs))       # keep order, drop duplicates
    return SpecFile(path, arch, unique)
