"""Row formats on the wire: what one token's row and its scales are, checked before launch.

A WireFormat says how a token of `hidden` channels is stored (bits per value, packing), how its
scales are grouped and laid out, and so which tensors a dispatch takes and returns. Normal-mode
dispatch moves bytes (the format only validates and names the tensors); low-latency dispatch
casts from BF16 in the kernel for the formats with `ll_cast` (the spec's wire_format field) and
moves opaque rows as they are.
The exact numerics of each cast are epgen/reference.py's quantizers; README "Wire formats".

Scale layouts (per token, row-major here; low-latency outputs are DeepEP's column-major view):
  none      no scales
  f32       float32 [T, ceil(H / group)]
  bytes_x4  int32 [T, ceil(ceil(H / group) / 4)]: 1-byte scales packed four per int32,
            little-endian, the last int zero-padded (DeepEP's use_ue8m0, DeepGEMM's packed UE8M0)
  nvfp4     int32 [T, ceil(H / 64) + 1]: the e4m3 block-scale bytes as bytes_x4, then the token's
            float32 global scale (reference.nvfp4_wire_scales)
  opaque    any 4-byte-aligned side row of side_bytes bytes, moved as it is
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

SCALE_LAYOUTS = ("none", "f32", "bytes_x4", "nvfp4", "opaque")


class FormatError(ValueError):
    """Data or scales that do not match the named wire format: names the argument, the value
    and the rule."""


def _err(name: str, value, rule: str) -> FormatError:
    return FormatError(f"{name}={value!r}: {rule}")


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


@dataclass(frozen=True)
class WireFormat:
    name: str
    bits: int                     # bits per value (opaque: 8, a byte)
    group: int                    # channels per scale; 0: no scales
    scale_dtype: str              # "none", "float32", "e8m0", "e4m3" (+ float32 global), "opaque"
    scale_layout: str             # one of SCALE_LAYOUTS
    packing: str                  # "bf16", "e4m3", "e2m1x2" (two per byte, low nibble first),
                                  # "bytes"
    data_dtype: Optional[str] = None   # a torch dtype's name; None: any element type (opaque)
    row_bytes: int = 0            # opaque: bytes of a row (0 otherwise: from hidden)
    side_bytes: int = 0           # opaque: bytes of the side row (0: no side tensor)
    hidden_multiple: int = 1      # the format's own rule on hidden (whole groups, packed bytes)
    ll_cast: bool = False         # low-latency dispatch casts BF16 to it in the kernel

    # -- shapes ------------------------------------------------------------------------------
    def data_width(self, hidden: int) -> int:
        """Elements of data_dtype in one row of `hidden` channels."""
        return hidden // 2 if self.packing == "e2m1x2" else hidden

    def hidden_of(self, data_width: int) -> int:
        return 2 * data_width if self.packing == "e2m1x2" else data_width

    def scale_cols(self, hidden: int) -> int:
        """4-byte scale columns of a row (the side row's for opaque)."""
        if self.scale_layout == "none":
            return 0
        if self.scale_layout == "opaque":
            return self.side_bytes // 4
        groups = _cdiv(hidden, self.group)
        if self.scale_layout == "f32":
            return groups
        if self.scale_layout == "bytes_x4":
            return _cdiv(groups, 4)
        return _cdiv(groups, 4) + 1                 # nvfp4: packed block scales + global scale

    def data_torch_dtype(self):
        """The torch dtype of the data (None: any); torch is imported only here and in check, so
        spec files and the command line read formats without it."""
        import torch
        return None if self.data_dtype is None else getattr(torch, self.data_dtype)

    def scale_torch_dtype(self):
        import torch
        return {"f32": torch.float32, "bytes_x4": torch.int32, "nvfp4": torch.int32}.get(
            self.scale_layout)

    def data_bytes(self, hidden: int) -> int:
        """Bytes of one row of data (without the scales)."""
        if self.scale_layout == "opaque" or self.packing == "bytes":
            return self.row_bytes
        return hidden * self.bits // 8

    def bytes_per_token(self, hidden: int) -> int:
        """Payload bytes of one token: data plus scales (what a dispatch moves per copy)."""
        return self.data_bytes(hidden) + 4 * self.scale_cols(hidden)

    # -- validation --------------------------------------------------------------------------
    def check_hidden(self, hidden: int, name: str = "hidden", width: Optional[int] = None) -> None:
        """width: the data width `name` has, when it is not `hidden` (packed values): the error
        shows the argument's own value and the channels it holds."""
        if hidden <= 0 or hidden % self.hidden_multiple:
            held = f" ({hidden} channels, {hidden // width} a byte)" \
                if width is not None and width != hidden else ""
            raise _err(name, hidden if width is None else width,
                       f"{self.name} needs a positive multiple of {self.hidden_multiple} "
                       f"channels{held}")

    def check(self, data, scales) -> int:
        """Validate dispatch's x (data, scales or None) against this format; return hidden.
        Names x[0] / x[1] when scales are given (the DeepEP tuple), x otherwise."""
        import torch
        dname = "x[0]" if scales is not None else "x"
        if not isinstance(data, torch.Tensor):
            raise _err(dname, type(data).__name__, "must be a torch.Tensor")
        if data.dim() != 2:
            raise _err(f"{dname}.shape", tuple(data.shape), "must be [num_tokens, width]")
        want_data = self.data_torch_dtype()
        if want_data is not None and data.dtype != want_data:
            raise _err(f"{dname}.dtype", data.dtype, f"must be {want_data} for {self.name}")
        T = data.size(0)
        if self.scale_layout == "opaque" or self.packing == "bytes":
            got = data.size(1) * data.element_size()
            if got != self.row_bytes:
                raise _err(f"{dname}.shape[1]", data.size(1),
                           f"rows of {got} bytes; {self.name} has {self.row_bytes}-byte rows")
            hidden = self.row_bytes
        else:
            hidden = self.hidden_of(data.size(1))
            self.check_hidden(hidden, f"{dname}.shape[1]", data.size(1))
        cols = self.scale_cols(hidden)
        if cols == 0:
            if scales is not None:
                raise _err("x[1]", "a tensor", f"{self.name} has no scales: pass x alone")
            return hidden
        if scales is None:
            raise _err("x", "a tensor", f"{self.name} needs (x, x_scales)")
        if not isinstance(scales, torch.Tensor):
            raise _err("x[1]", type(scales).__name__, "must be a torch.Tensor")
        want = self.scale_torch_dtype()
        if want is not None and scales.dtype != want:
            raise _err("x[1].dtype", scales.dtype, f"must be {want} for {self.name} "
                                                   f"({self.scale_layout} scale layout)")
        if scales.dim() != 2 or scales.size(0) != T:
            raise _err("x[1].shape", tuple(scales.shape), f"must be [{T}, side width]")
        side = scales.size(1) * scales.element_size()
        if side != 4 * cols:
            shape = f"[{T}, {cols}]" if want is not None else f"{4 * cols} bytes a row"
            raise _err("x[1].shape", tuple(scales.shape),
                       f"{self.name} at hidden {hidden} has scales {shape}")
        if scales.element_size() != 4 and scales.stride(-1) != 1:
            raise _err("x[1].stride", scales.stride(), "side rows of elements other than 4 bytes "
                                                       "must be contiguous (moved as 4-byte words)")
        return hidden


def _builtin(*formats: WireFormat) -> dict[str, WireFormat]:
    return {f.name: f for f in formats}


BF16 = WireFormat("bf16", 16, 0, "none", "none", "bf16", "bfloat16")
FP8_E4M3_F32_128 = WireFormat("fp8_e4m3_f32_128", 8, 128, "float32", "f32", "e4m3",
                              "float8_e4m3fn", ll_cast=True)
FP8_UE8M0_128 = WireFormat("fp8_ue8m0_128", 8, 128, "e8m0", "bytes_x4", "e4m3",
                           "float8_e4m3fn", ll_cast=True)
MXFP8 = WireFormat("mxfp8", 8, 32, "e8m0", "bytes_x4", "e4m3", "float8_e4m3fn",
                   hidden_multiple=32, ll_cast=True)
NVFP4 = WireFormat("nvfp4", 4, 16, "e4m3", "nvfp4", "e2m1x2", "uint8", hidden_multiple=32,
                   ll_cast=True)

FORMATS: dict[str, WireFormat] = _builtin(BF16, FP8_E4M3_F32_128, FP8_UE8M0_128, MXFP8, NVFP4)


def OPAQUE(row_bytes: int, side_bytes: int = 0) -> WireFormat:  # noqa: N802 (a constructor)
    """Rows of `row_bytes` bytes of any element type plus an optional side row of side_bytes
    bytes (any element type, a multiple of 4 bytes), moved as they are: a recipe epgen does not
    know needs no kernel code. Low-latency mode moves them too (nothing cast) and needs both to be
    multiples of 16 bytes (low_latency_fields)."""
    for name, v, rule in (("row_bytes", row_bytes, 16), ("side_bytes", side_bytes, 4)):
        if not isinstance(v, int) or isinstance(v, bool) or v < (1 if name == "row_bytes" else 0) \
                or v % rule:
            raise _err(name, v, f"must be a {'positive ' if name == 'row_bytes' else ''}"
                                f"multiple of {rule}")
    return WireFormat(f"opaque{row_bytes}" + (f"+{side_bytes}" if side_bytes else ""), 8, 0,
                      "opaque" if side_bytes else "none", "opaque" if side_bytes else "none",
                      "bytes", None, row_bytes, side_bytes)


def get(fmt, name: str = "wire_format") -> WireFormat:
    """A WireFormat from itself, a built-in's name, or "opaque<row>[+<side>]" (e.g.
    "opaque7168+64"); FormatError naming `name` otherwise."""
    if isinstance(fmt, WireFormat):
        return fmt
    if isinstance(fmt, str):
        if fmt in FORMATS:
            return FORMATS[fmt]
        if fmt.startswith("opaque"):
            row, _, side = fmt[len("opaque"):].partition("+")
            if row.isdigit() and (side == "" or side.isdigit()):
                return OPAQUE(int(row), int(side or 0))
    raise _err(name, fmt, f"must be a WireFormat, one of {sorted(FORMATS)} or "
                          "'opaque<row bytes>[+<side bytes>]'")


def of_low_latency_flags(use_fp8: bool, round_scale: bool, use_ue8m0: bool) -> str:
    """The format DeepEP's low-latency flags name (round_scale alone keeps float32 scales)."""
    if not use_fp8:
        return BF16.name
    return FP8_UE8M0_128.name if use_ue8m0 else FP8_E4M3_F32_128.name


LOW_LATENCY = ("bf16", "fp8_e4m3_f32_128", "fp8_ue8m0_128", "mxfp8", "nvfp4")


# Where low-latency dispatch stores recv_x_scales, per local expert (templates/
# ll_scale_layout.cuh; reference.scale_word_offsets; README "Wire formats"): name -> the formats
# it takes. "deepep" (the default) is DeepEP's column-major [E, RM, cols] view of [E, cols, RM];
# "deepgemm" the same with RM padded to a multiple of 4 (16 bytes) in the strides, DeepGEMM's
# MN-major TMA-aligned scales (get_mn_major_tma_aligned_tensor / _packed_ue8m0_tensor), which its
# masked grouped GEMMs take without a copy; "cutlass_128x4" the block-scale bytes in CUTLASS's /
# cuBLAS's 128x4 scale-factor tiles (TensorRT-LLM's SWIZZLED_128x4, FlashInfer's
# nvfp4_block_scale_interleave), NVFP4's global scales beside them.
RECV_SCALE_LAYOUTS = {
    "deepep": ("fp8_e4m3_f32_128", "fp8_ue8m0_128", "mxfp8", "nvfp4"),
    "deepgemm": ("fp8_e4m3_f32_128", "fp8_ue8m0_128", "mxfp8"),
    "cutlass_128x4": ("mxfp8", "nvfp4"),
}


def recv_scale_layout_field(fmt: WireFormat, layout) -> dict:
    """LowLatencyDispatchSpec's recv_scale_layout field for low_latency_dispatch's argument
    (None: "deepep"); FormatError naming it when the format has no such layout."""
    if layout is None or (layout == "deepep" and fmt.name in RECV_SCALE_LAYOUTS["deepep"]):
        return dict(recv_scale_layout="")
    if layout not in RECV_SCALE_LAYOUTS:
        raise _err("recv_scale_layout", layout, f"must be one of {sorted(RECV_SCALE_LAYOUTS)}")
    if fmt.name not in RECV_SCALE_LAYOUTS[layout]:
        raise _err("recv_scale_layout", layout, f"is a layout of {RECV_SCALE_LAYOUTS[layout]}, "
                                                f"not of {fmt.name}")
    return dict(recv_scale_layout="" if layout == "deepep" else layout)


def low_latency_fields(fmt: WireFormat, round_scale: bool = False) -> dict:
    """LowLatencyDispatchSpec's format fields for a format low-latency dispatch sends (BF16 and
    opaque rows copied; the others cast in the kernel). round_scale: power-of-two float32 scales,
    the one variant of fp8_e4m3_f32_128 (DeepEP's round_scale without use_ue8m0)."""
    if fmt.packing == "bytes":     # opaque: moved as bytes, 16 at a time (ll_dispatch.cuh FMT 3)
        for name, v in (("row", fmt.row_bytes), ("side", fmt.side_bytes)):
            if v % 16:
                raise _err("wire_format", fmt.name, f"low-latency dispatch moves opaque rows and "
                                                    f"side rows of multiples of 16 bytes (its "
                                                    f"{name} has {v})")
        return dict(use_fp8=False, round_scale=False, use_ue8m0=False, wire_format=fmt.name)
    if fmt.name not in LOW_LATENCY:
        raise _err("wire_format", fmt.name, f"low-latency dispatch sends one of {LOW_LATENCY} "
                                            "(cast from BF16 in the kernel) or "
                                            "'opaque<row bytes>[+<side bytes>]'")
    fp8 = fmt.name.startswith("fp8")
    ue8m0 = fmt is FP8_UE8M0_128
    return dict(use_fp8=fp8, round_scale=ue8m0 or (fp8 and round_scale), use_ue8m0=ue8m0,
                wire_format="" if fp8 or fmt is BF16 else fmt.name)


# -- low-latency combine ------------------------------------------------------------------------
# What a low-latency combine's expert outputs (always BF16 in and out) cross the wire as; the
# receiver decodes to float32 and sums there (reference.combine_wire_values, README "Wire
# formats"). bf16 and fp8_e4m3_f32_128 are the dispatch formats of those names (FP8: e4m3 +
# float32 scale_inv per 128 channels, reference.per_token_cast_to_fp8); logfmt10 is DeepEP's
# LogFMT-10 (use_logfmt=True). Name one with low_latency_combine(wire_format=...).
LOGFMT10 = "logfmt10"
COMBINE_FORMATS = (BF16.name, FP8_E4M3_F32_128.name, LOGFMT10)


def combine_format(wire_format, use_logfmt: bool = False, zero_copy: bool = False) -> str:
    """The combine format's name from low_latency_combine's arguments: wire_format (a name in
    COMBINE_FORMATS, or the WireFormat of bf16 / fp8_e4m3_f32_128), else use_logfmt's choice;
    FormatError naming the argument otherwise (a conflict with use_logfmt, zero_copy with a
    format that is not BF16: zero_copy hands over the BF16 rows themselves)."""
    if wire_format is None:
        name = LOGFMT10 if use_logfmt else BF16.name
    else:
        name = wire_format.name if isinstance(wire_format, WireFormat) else wire_format
        if name not in COMBINE_FORMATS:
            raise _err("wire_format", wire_format, f"a low-latency combine sends one of "
                                                   f"{COMBINE_FORMATS}")
        if use_logfmt and name != LOGFMT10:
            raise _err("wire_format", name, "conflicts with use_logfmt=True (which names "
                                            f"{LOGFMT10!r})")
    if zero_copy and name != BF16.name:
        raise _err("zero_copy", True, f"needs the bf16 combine format, not {name!r} (as DeepEP "
                                      "refuses zero_copy with use_logfmt)")
    return name


def combine_fields(name: str) -> dict:
    """LowLatencyCombineSpec's format field for a COMBINE_FORMATS name."""
    return dict(wire_format="" if name == BF16.name else name)
