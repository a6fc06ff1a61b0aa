"""Kernel specs: the complete compile-time identity of each generated kernel family.

A spec is a frozen dataclass. Every value that changes the binary is one of its fields, and
nothing else does (no stray -D flags): spec -> rendered source -> cache key. Fields with
defaults enter the name's tag only when they differ from the default, so adding one keeps the
kernels' names; the unit's spec struct (constants()) carries every int / bool field, so a new
one changes its family's sources and keys once, not its cubins.
Run-time values (token counts, SM counts, max tokens per rank, ring sizes) are never fields.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass
from typing import ClassVar

from . import kernel_args as A
from . import layout_facts

NAMESPACE = "epgen"
DTYPES = ("bf16", "fp8")
MAX_TOPK = layout_facts.MAX_TOPK
MAX_RANKS = 64           # one node of NVLink peers in normal mode is checked separately
MAX_NVL_RANKS = layout_facts.NORMAL_MAX_RANKS
MAX_RANK_SIG = layout_facts.LL_MAX_RANK_SIG    # low-latency per-rank signal words
MAX_EXPERTS = layout_facts.MAX_EXPERTS
MAX_SCALE_COLS = 512     # scale columns a normal-mode FP8 row may carry
# Low-latency wire formats cast in the kernel beyond DeepEP's flags (epgen.formats names; "" is
# the format use_fp8 / round_scale / use_ue8m0 name). The index is the template's FMT; FMT 3 is
# every opaque format, "opaque<row bytes>[+<side bytes>]" (ll_opaque_widths), moved as bytes.
LL_WIRE_FORMATS = ("", "mxfp8", "nvfp4")
LL_OPAQUE_CODE = 3


def ll_opaque_widths(wire_format: str):
    """(row bytes, side bytes) of an opaque low-latency wire_format, None for the others."""
    if not wire_format.startswith("opaque"):
        return None
    from .. import formats     # a module without imports of its own: spec files read it too
    try:
        fmt = formats.get(wire_format)
    except formats.FormatError:
        return None
    return fmt.row_bytes, fmt.side_bytes
# Where low-latency dispatch stores the received scales (epgen.formats.RECV_SCALE_LAYOUTS; "" is
# "deepep", today's). The index is the template's SFL (templates/ll_scale_layout.cuh).
LL_SCALE_LAYOUTS = ("", "deepgemm", "cutlass_128x4")
# Low-latency combine wire formats (epgen.formats.COMBINE_FORMATS; "" is BF16). The index is
# the template's FMT (templates/ll_combine_wire.cuh).
LL_COMBINE_FORMATS = ("", "fp8_e4m3_f32_128", "logfmt10")
# The largest hidden size accepted (README): every family compiles there without spills; the
# GPU suites run up to 7168, and a Buffer's own size checks still apply at run time.
MAX_HIDDEN = 16384


# Metadata of a field added after kernels were cached: left out of describe() at its default.
NEW_FIELD = {"new_field": True}


class SpecError(ValueError):
    """An impossible spec: names the field, its value and the rule it breaks (kept apart too,
    so an operation can re-word it with its caller's argument names: ops/context.py)."""

    def __init__(self, spec: str, field: str, value, rule: str):
        self.spec, self.field, self.value, self.rule = spec, field, value, rule
        super().__init__(f"{spec}.{field}={value!r}: {rule}")


def _require(ok: bool, spec: str, field: str, value, rule: str) -> None:
    if not ok:
        raise SpecError(spec, field, value, rule)


@dataclass(frozen=True)
class Entry:
    """One `__global__` kernel of a family's translation unit (templates/kernel.cu.j2)."""
    kind: str                  # its role; the kernel is named `{kind}_{spec.tag}`
    device: str                # the header's template taking the spec struct: device<Spec>(args)
    args: type                 # its argument struct (kernel_args; rendered into the unit)
    threads: str = "threads"   # the spec constant bounding its block (__launch_bounds__)
    min_blocks: int | None = 1  # __launch_bounds__' second argument (None: not given)


# Every family by name, filled as the spec classes below are defined (KernelSpec.__init_subclass__).
FAMILIES: dict[str, type["KernelSpec"]] = {}


@dataclass(frozen=True)
class KernelSpec:
    """Base of every family. Subclasses set `family`, `headers` and `entries`."""

    family: ClassVar[str] = ""
    # The unit's template: one for every family (the spec struct and entries vary, not its shape).
    template: ClassVar[str] = "kernel.cu.j2"
    headers: ClassVar[tuple[str, ...]] = ()        # the device headers the unit includes
    # Kernels the translation unit defines, by role; the first is the one doing the work.
    entries: ClassVar[tuple[Entry, ...]] = ()

    def __init_subclass__(cls, **kw):
        """A family registers itself by being defined (FAMILIES: spec files, cache manifests
        and `spec_from_json` find it by name); two classes may not claim one name."""
        super().__init_subclass__(**kw)
        name = cls.__dict__.get("family")
        if name:
            if name in FAMILIES:
                raise TypeError(f"kernel family {name!r}: defined by {FAMILIES[name].__name__} "
                                f"and {cls.__name__}")
            FAMILIES[name] = cls

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", int):
                _require(isinstance(value, int) and not isinstance(value, bool),
                         type(self).__name__, f.name, value, "must be an int")
            if f.type in ("bool", bool):
                _require(isinstance(value, bool), type(self).__name__, f.name, value,
                         "must be a bool")
        self.validate()

    def validate(self) -> None:  # pragma: no cover - every family overrides
        raise NotImplementedError

    @property
    def entry_kinds(self) -> tuple[str, ...]:
        return tuple(e.kind for e in self.entries)

    # -- what the kernel sees (codegen renders these; the kernel reads them by name) ---------
    @property
    def struct_name(self) -> str:
        """The C++ struct carrying the spec into the unit: `device<NormalDispatchSpec>(args)`."""
        return type(self).__name__

    def constants(self) -> dict:
        """name -> int / bool of the spec struct: every int and bool field, then `derived()`.
        (String fields reach the kernel as a derived code.) The device reads them by name, so
        reordering or adding fields cannot silently swap two template arguments."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.type in ("int", int, "bool", bool)}
        out.update(self.derived())
        return out

    def derived(self) -> dict:
        """Values the kernel needs that the host computes from the fields (none by default)."""
        return {}

    def device_checks(self) -> tuple[tuple[str, int | None, str], ...]:
        """(C++ expression, value, message): host facts the device derives on its own
        (layout_facts' record and message sizes); the unit static_asserts each expression
        equals the value (None: is true). `{S}` in an expression is the spec struct."""
        return ()

    def _req(self, ok: bool, field: str, rule: str) -> None:
        _require(ok, type(self).__name__, field, getattr(self, field), rule)

    # -- identity --------------------------------------------------------------------------
    def fields(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def rendered_fields(self) -> dict:
        """Required fields always, defaulted fields only where they differ from the default."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.default is dataclasses.MISSING or value != f.default:
                out[f.name] = value
        return out

    @property
    def tag(self) -> str:
        """Short readable suffix plus a hash of every rendered field (unique per spec)."""
        digest = hashlib.sha256(json.dumps(
            {"family": self.family, **self.rendered_fields()}, sort_keys=True).encode())
        return f"{self.readable_tag()}_{digest.hexdigest()[:6]}"

    def readable_tag(self) -> str:
        return "_".join(f"{k}{v}" for k, v in self.rendered_fields().items())

    def kernel_name(self, kind: str | None = None) -> str:
        """Unqualified C++ name of one entry kernel; derived here only."""
        kind = kind or self.entry_kinds[0]
        if kind not in self.entry_kinds:
            raise KeyError(f"{type(self).__name__} has no kernel of kind {kind!r} "
                           f"(has {self.entry_kinds})")
        return f"{kind}_{self.tag}"

    def entry(self, kind: str | None = None) -> str:
        """Qualified name as NVRTC name expression and for lookup: `epgen::dispatch_...`."""
        return f"{NAMESPACE}::{self.kernel_name(kind)}"

    @property
    def name(self) -> str:
        """The cache entry's name: the main kernel's name."""
        return self.kernel_name()

    def describe(self) -> str:
        """Every field, except those added later with metadata NEW_FIELD while at their
        default: the description is rendered into the source, and a kernel that does not
        use a new field must keep its bytes."""
        shown = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                 if not (f.metadata.get("new_field") and getattr(self, f.name) == f.default)}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    def args_structs(self) -> tuple[type, ...]:
        """The argument struct of each entry, in `entries` order (rendered into the unit)."""
        return tuple(e.args for e in self.entries)

    def to_json(self) -> dict:
        return {"family": self.family, **self.fields()}


def _check_common(spec: KernelSpec, *, hidden: bool = True, topk: bool = True,
                  experts: bool = True, ranks_max: int = MAX_RANKS) -> None:
    spec._req(2 <= spec.num_ranks <= ranks_max, "num_ranks", f"must be in [2, {ranks_max}]")
    if experts:
        spec._req(0 < spec.num_experts <= MAX_EXPERTS, "num_experts", f"must be in [1, {MAX_EXPERTS}]")
        spec._req(spec.num_experts % spec.num_ranks == 0, "num_experts",
                  f"must be divisible by num_ranks={spec.num_ranks}")
    if topk:
        spec._req(0 <= spec.num_topk <= MAX_TOPK, "num_topk", f"must be in [0, {MAX_TOPK}] (0: no top-k)")
        if experts:
            spec._req(spec.num_topk <= spec.num_experts, "num_topk",
                      f"must be <= num_experts={spec.num_experts}")
    if hidden:
        spec._req(0 < spec.hidden <= MAX_HIDDEN, "hidden", f"must be in [1, {MAX_HIDDEN}]")


num_scales = layout_facts.num_scales    # FP8 scale columns of a row


@dataclass(frozen=True)
class LayoutSpec(KernelSpec):
    """get_dispatch_layout: per-rank / per-expert counts and the token-in-rank mask."""
    family: ClassVar[str] = "layout"
    headers: ClassVar[tuple[str, ...]] = ("layout.cuh",)
    entries: ClassVar[tuple[Entry, ...]] = (Entry("layout", "layout_entry", A.LayoutArgs, min_blocks=None),)

    num_ranks: int
    num_experts: int
    num_topk: int
    threads: int = 256
    # Ranks per node when the Buffer spans nodes (then num_tokens_per_rdma_rank is counted too);
    # 0: one node, the kernel of before.
    ranks_per_node: int = dataclasses.field(default=0, metadata=NEW_FIELD)

    def validate(self):
        _check_common(self, hidden=False)
        self._req(self.num_topk >= 1, "num_topk", "must be >= 1 (layout needs top-k indices)")
        self._req(self.threads in (128, 256, 512), "threads", "must be 128, 256 or 512")
        L = self.ranks_per_node
        self._req(L == 0 or (0 < L < self.num_ranks and self.num_ranks % L == 0),
                  "ranks_per_node", f"must be 0 (one node) or a divisor of num_ranks="
                  f"{self.num_ranks} below it")

    def readable_tag(self):
        nodes = f"_n{self.num_ranks // self.ranks_per_node}" if self.ranks_per_node else ""
        return f"k{self.num_topk}_e{self.num_experts}_r{self.num_ranks}{nodes}"

    def args_structs(self) -> tuple[type, ...]:
        return (A.LayoutNodesArgs,) if self.ranks_per_node else (A.LayoutArgs,)


@dataclass(frozen=True)
class NormalDispatchSpec(KernelSpec):
    """Normal-mode intranode dispatch (+ its notify helper) over NVLink."""
    family: ClassVar[str] = "normal_dispatch"
    headers: ClassVar[tuple[str, ...]] = ("normal_dispatch.cuh",)
    entries: ClassVar[tuple[Entry, ...]] = (
        Entry("dispatch", "normal_dispatch_entry", A.NormalDispatchArgs),
        Entry("notify", "normal_notify_entry", A.NotifyArgs, threads="notify_threads"))
    # The notify kernel the TU also holds: a block of this many threads (not a field: one size
    # serves every spec, and the ops launch it with the spec's value).
    notify_threads: ClassVar[int] = layout_facts.NORMAL_NOTIFY_THREADS

    hidden: int
    num_topk: int          # 0: dispatch without top-k indices/weights
    num_experts: int
    num_ranks: int
    # On the wire (the kernel moves bytes): "bf16", rows of 2 * hidden bytes; "fp8", rows of
    # hidden bytes plus scale_cols 4-byte scales (float32, or int32 packed UE8M0). Rows of any
    # other element type are keyed by their width: normal_dispatch_spec.
    dtype: str = "bf16"
    threads: int = 768
    scale_cols: int = -1   # fp8 only: -1 is ceil(hidden / 128), one per 128 channels

    def validate(self):
        _check_common(self, ranks_max=MAX_NVL_RANKS)
        self._req(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}")
        rule = 16 if self.dtype == "fp8" else 8
        self._req(self.hidden % rule == 0, "hidden",
                  f"must be a multiple of {rule} for {self.dtype} (16-byte rows)")
        self._req(self.threads % 32 == 0 and 256 <= self.threads <= 1024, "threads",
                  "must be a multiple of 32 in [256, 1024]")
        if self.dtype == "fp8":
            self._req(self.scale_cols == -1 or 1 <= self.scale_cols <= MAX_SCALE_COLS,
                      "scale_cols", f"must be -1 (one per 128 channels) or in [1, {MAX_SCALE_COLS}]")
        else:
            self._req(self.scale_cols == -1, "scale_cols", "must be -1 (bf16 rows have no scales)")
        # normal_dispatch.cuh: a warp group per sender (self included) and per receiver.
        groups = 2 * self.num_ranks - 1
        self._req(self.threads // 32 >= groups, "threads",
                  f"must be >= {32 * groups} for num_ranks={self.num_ranks} (one warp for each "
                  f"of the {groups} sender/receiver groups)")

    @property
    def num_scales(self) -> int:
        if self.dtype != "fp8":
            return 0
        return num_scales(self.hidden) if self.scale_cols < 0 else self.scale_cols

    @property
    def hidden_bytes(self) -> int:
        return self.hidden * (1 if self.dtype == "fp8" else 2)

    def derived(self):
        El = self.num_experts // self.num_ranks
        return dict(experts_per_rank=El, hidden_bytes=self.hidden_bytes,
                    num_scales=self.num_scales, notify_threads=self.notify_threads,
                    notify_local_experts=El)

    def device_checks(self):
        return (("DispatchCfgOf<{S}>::kRec", layout_facts.normal_dispatch_record_bytes(
                    self.hidden_bytes, self.num_scales, self.num_topk), "ring record size"),)

    def readable_tag(self):
        return f"{self.dtype}_h{self.hidden}_k{self.num_topk}_e{self.num_experts}_r{self.num_ranks}"


@dataclass(frozen=True)
class NormalCombineSpec(KernelSpec):
    """Normal-mode intranode combine: sum over the ranks a token went to, plus biases."""
    family: ClassVar[str] = "normal_combine"
    headers: ClassVar[tuple[str, ...]] = ("normal_combine.cuh", "normal_notify.cuh")
    # The notify is barrier-only (notify_local_experts 1): it runs when the combine ring layout
    # changes between calls.
    entries: ClassVar[tuple[Entry, ...]] = (
        Entry("combine", "normal_combine_entry", A.NormalCombineArgs),
        Entry("notify", "normal_notify_entry", A.NotifyArgs, threads="notify_threads"))
    # The notify kernel the TU also holds: a block of this many threads (not a field: one size
    # serves every spec, and the ops launch it with the spec's value).
    notify_threads: ClassVar[int] = layout_facts.NORMAL_NOTIFY_THREADS

    hidden: int
    num_topk: int          # 0: no top-k weights to combine
    num_ranks: int
    num_biases: int = 0
    threads: int = 512     # 128 registers a thread: 8 loads in flight per reducer lane, no spills

    def validate(self):
        _check_common(self, experts=False, ranks_max=MAX_NVL_RANKS)
        self._req(self.hidden % 8 == 0, "hidden", "must be a multiple of 8 (16-byte bf16 rows)")
        self._req(self.num_biases in (0, 1, 2), "num_biases", "must be 0, 1 or 2")
        self._req(self.threads % 32 == 0 and 256 <= self.threads <= 1024, "threads",
                  "must be a multiple of 32 in [256, 1024]")
        # normal_combine.cuh's CombineCfg: sender warps per remote rank, the rest reduce.
        warps, remote = self.threads // 32, self.num_ranks - 1
        reducers = warps - remote * max(1, warps // (2 * remote))
        self._req(reducers >= 1, "threads",
                  f"must leave a reducer warp beside one sender warp per remote rank "
                  f"(num_ranks={self.num_ranks}: at least {32 * (remote + 1)})")

    def derived(self):
        return dict(notify_threads=self.notify_threads, notify_local_experts=1)

    def device_checks(self):
        return (("CombineCfgOf<{S}>::kRec", layout_facts.normal_combine_record_bytes(
                    self.hidden, self.num_topk), "ring record size"),)

    def readable_tag(self):
        return f"bf16_h{self.hidden}_k{self.num_topk}_r{self.num_ranks}_b{self.num_biases}"


@functools.lru_cache(maxsize=256)
def normal_dispatch_spec(hidden: int, num_topk: int, num_experts: int | None, num_ranks: int,
                         dtype: str, scale_cols: int = -1) -> "NormalDispatchSpec":
    """The spec a normal dispatch call compiles (ops and precompile both ask here).

    num_experts=None: a cached dispatch, which has no top-k and no per-expert counts, so the
    experts change nothing in it and are canonicalised away (one kernel per hidden, ranks and
    dtype serves every cached dispatch). An uncached dispatch passes its experts, with or without
    top-k: its notify sums the per-expert counts. scale_cols equal to the default (one per 128
    channels) is canonicalised to -1, so those keys stay what they were."""
    if dtype == "fp8" and scale_cols == num_scales(hidden):
        scale_cols = -1
    return NormalDispatchSpec(hidden=hidden, num_topk=num_topk,
                              num_experts=num_ranks if num_experts is None else num_experts,
                              num_ranks=num_ranks, dtype=dtype, scale_cols=scale_cols)


def normal_dispatch_wire(row_bytes: int, num_scale_cols: int) -> tuple[int, str]:
    """(hidden, dtype) of the spec that moves rows of `row_bytes` bytes with `num_scale_cols`
    4-byte scales. The kernel copies bytes, so a row without scales of any element type is keyed
    as the BF16 row of the same width (float32 [T, 2048] shares BF16 [T, 4096]'s kernel), and a
    row with scales (1-byte elements, DeepEP's rule) as FP8 of that many channels."""
    if num_scale_cols:
        return row_bytes, "fp8"
    return row_bytes // 2, "bf16"


ll_payload_bytes = layout_facts.ll_payload_bytes   # a dispatch message's payload


@dataclass(frozen=True)
class LowLatencyDispatchSpec(KernelSpec):
    """Low-latency dispatch: one launch per phase (send, receive, or both)."""
    family: ClassVar[str] = "ll_dispatch"
    headers: ClassVar[tuple[str, ...]] = ("ll_dispatch.cuh",)
    # "ll_": its kernel (and cache entry) names differ from the normal family's at a glance.
    entries: ClassVar[tuple[Entry, ...]] = (Entry("ll_dispatch", "ll_dispatch_entry", A.LowLatencyDispatchArgs),)

    hidden: int
    num_topk: int
    num_experts: int
    num_ranks: int
    use_fp8: bool = True
    round_scale: bool = False
    use_ue8m0: bool = False
    threads: int = 1024
    wire_format: str = ""   # LL_WIRE_FORMATS: "mxfp8" / "nvfp4" cast to that format
    # LL_SCALE_LAYOUTS: the layout of recv_x_scales ("": DeepEP's)
    recv_scale_layout: str = dataclasses.field(default="", metadata=NEW_FIELD)

    def validate(self):
        _check_common(self)
        self._req(self.num_topk >= 1, "num_topk", "must be >= 1")
        self._req(self.hidden % 16 == 0, "hidden", "must be a multiple of 16 in low-latency mode")
        opaque = ll_opaque_widths(self.wire_format)
        self._req(self.wire_format in LL_WIRE_FORMATS or opaque is not None, "wire_format",
                  f"must be one of {LL_WIRE_FORMATS} or 'opaque<row bytes>[+<side bytes>]'")
        if opaque is not None:
            row, side = opaque
            self._req(not (self.use_fp8 or self.round_scale or self.use_ue8m0), "wire_format",
                      "names the format itself: use_fp8, round_scale and use_ue8m0 must be False")
            self._req(row % 16 == 0 and side % 16 == 0, "wire_format",
                      "opaque rows and side rows must be multiples of 16 bytes in low-latency mode")
            self._req(layout_facts.ll_opaque_fits(self.hidden, row, side), "wire_format",
                      f"rows plus side rows must be at most 2 * hidden = {2 * self.hidden} "
                      "bytes (a BF16 row's room in the region)")
            self._req(self.recv_scale_layout == "", "recv_scale_layout",
                      "opaque side rows are returned as they are (no scale layout)")
        elif self.wire_format:
            self._req(not (self.use_fp8 or self.round_scale or self.use_ue8m0), "wire_format",
                      "names the format itself: use_fp8, round_scale and use_ue8m0 must be False")
            self._req(self.hidden % 32 == 0, "hidden",
                      f"must be a multiple of 32 for {self.wire_format}")
        if self.use_ue8m0:
            self._req(self.round_scale, "use_ue8m0", "needs round_scale=True")
        self._req(self.recv_scale_layout in LL_SCALE_LAYOUTS, "recv_scale_layout",
                  f"must be one of {LL_SCALE_LAYOUTS}")
        if self.recv_scale_layout == "deepgemm":
            self._req(self.use_fp8 or self.wire_format == "mxfp8", "recv_scale_layout",
                      "deepgemm needs FP8 (use_fp8) or mxfp8 scales")
        if self.recv_scale_layout == "cutlass_128x4":
            self._req(self.wire_format in ("mxfp8", "nvfp4"), "recv_scale_layout",
                      "cutlass_128x4 needs wire_format mxfp8 or nvfp4")
        if not self.use_fp8:
            self._req(not self.round_scale and not self.use_ue8m0, "round_scale",
                      "round_scale/use_ue8m0 need use_fp8=True")
        self._req(self.threads % 32 == 0 and 256 <= self.threads <= 1024, "threads",
                  "must be a multiple of 32 in [256, 1024]")
        self._req(self.threads >= self.num_experts, "threads",
                  f"must be >= num_experts={self.num_experts} (one thread per expert signal)")

    @property
    def num_scales(self) -> int:
        return num_scales(self.hidden) if self.use_fp8 else 0

    @property
    def payload_bytes(self) -> int:
        opaque = ll_opaque_widths(self.wire_format)
        if opaque is not None:
            return layout_facts.ll_opaque_payload_bytes(*opaque)
        return ll_payload_bytes(self.hidden, self.use_fp8, self.wire_format)

    @property
    def wire_format_code(self) -> int:
        if ll_opaque_widths(self.wire_format) is not None:
            return LL_OPAQUE_CODE
        return LL_WIRE_FORMATS.index(self.wire_format)

    def derived(self):
        row, side = ll_opaque_widths(self.wire_format) or (0, 0)
        return dict(wire_format_code=self.wire_format_code,
                    recv_scale_layout_code=LL_SCALE_LAYOUTS.index(self.recv_scale_layout),
                    opaque_row_bytes=row, opaque_side_bytes=side)

    def device_checks(self):
        # The launch's dynamic shared memory is payload_bytes; the host sizes the receive slots
        # and the staging for the largest message (layout_facts.ll_message_slot_bytes).
        H = self.hidden
        return (("LLDispatchOf<{S}>::kPayload", self.payload_bytes, "payload size"),
                ("LLDispatchOf<{S}>::kHdr", layout_facts.ll_header_bytes(self.num_topk),
                 "message header size"),
                ("LLDispatchOf<{S}>::kMsg <= " + str(layout_facts.ll_message_slot_bytes(H)),
                 None, "message fits its receive slot"),
                ("LLDispatchOf<{S}>::kPayload + LLDispatchOf<{S}>::kMaxDst * LLDispatchOf<{S}>::kHdr"
                 " <= " + str(layout_facts.ll_staging_bytes(H, self.num_ranks)), None,
                 "a token's send staging fits its slot"))

    def readable_tag(self):
        dt = "fp8" + ("_ue8m0" if self.use_ue8m0 else "_rs" if self.round_scale else "") \
            if self.use_fp8 else self.wire_format.replace("+", "s") or "bf16"   # a C name
        sf = f"_{self.recv_scale_layout}" if self.recv_scale_layout else ""
        return f"{dt}{sf}_h{self.hidden}_k{self.num_topk}_e{self.num_experts}_r{self.num_ranks}"


@dataclass(frozen=True)
class LowLatencyCombineSpec(KernelSpec):
    """Low-latency combine: weighted sum of expert outputs, skipping topk_idx == -1."""
    family: ClassVar[str] = "ll_combine"
    headers: ClassVar[tuple[str, ...]] = ("ll_combine.cuh",)
    entries: ClassVar[tuple[Entry, ...]] = (Entry("ll_combine", "ll_combine_entry", A.LowLatencyCombineArgs),)

    hidden: int
    num_topk: int
    num_experts: int
    num_ranks: int
    threads: int = 1024
    # LL_COMBINE_FORMATS: what the rows cross the wire as ("": BF16)
    wire_format: str = dataclasses.field(default="", metadata=NEW_FIELD)

    def validate(self):
        _check_common(self)
        self._req(self.num_topk >= 1, "num_topk", "must be >= 1")
        self._req(self.hidden % 16 == 0, "hidden", "must be a multiple of 16 in low-latency mode")
        self._req(self.threads % 32 == 0 and 256 <= self.threads <= 1024, "threads",
                  "must be a multiple of 32 in [256, 1024]")
        self._req(self.threads >= self.num_experts, "threads",
                  f"must be >= num_experts={self.num_experts} (one thread per expert signal)")
        self._req(self.wire_format in LL_COMBINE_FORMATS, "wire_format",
                  f"must be one of {LL_COMBINE_FORMATS}")

    @property
    def wire_format_code(self) -> int:
        return LL_COMBINE_FORMATS.index(self.wire_format)

    def derived(self):
        return dict(wire_format_code=self.wire_format_code)

    def device_checks(self):
        # The host sizes every combine slot for LogFMT-10's largest message; FP8's scales are
        # one per SCALE_GROUP channels.
        return (("llw::Wire<{S}::hidden>::kLogfmtBytes",
                 layout_facts.ll_combine_slot_bytes(self.hidden), "combine slot size"),
                ("llw::Wire<{S}::hidden>::kS", num_scales(self.hidden), "combine FP8 scales"),
                *((f"LLCombineOf<{{S}}>::recv_rows({M})", layout_facts.ll_combine_recv_rows(
                    M, self.num_ranks, self.num_experts, self.num_topk),
                   f"combine receive rows for M={M}") for M in (7, layout_facts.LL_MAX_TOKENS)))

    def readable_tag(self):
        return (f"{self.wire_format or 'bf16'}_h{self.hidden}_k{self.num_topk}"
                f"_e{self.num_experts}_r{self.num_ranks}")


@dataclass(frozen=True)
class LowLatencyCombineRankSpec(LowLatencyCombineSpec):
    """Low-latency combine reduced per expert rank (EPGEN_LL_COMBINE=per_rank): same fields and
    rules as the per-expert one, its own family so that kernel's source stays as it is."""
    family: ClassVar[str] = "ll_combine_rank"
    headers: ClassVar[tuple[str, ...]] = ("ll_combine_rank.cuh",)
    entries: ClassVar[tuple[Entry, ...]] = (Entry("ll_combine", "ll_combine_rank_entry", A.LowLatencyCombineRankArgs),)

    def device_checks(self):
        args = (self.hidden, self.num_ranks, self.num_topk)
        return tuple((f"LLCombineRankOf<{{S}}>::half_bytes({M})",
                      layout_facts.ll_per_rank_half_bytes(M, *args), f"area half for M={M}")
                     for M in (1, 7, layout_facts.LL_MAX_TOKENS))   # 7: the 256 B padding

    def validate(self):
        super().validate()
        self._req(self.wire_format == "", "wire_format",
                  "the per-rank combine sends BF16 partial sums only")

    def readable_tag(self):
        return "rank_" + super().readable_tag()


@dataclass(frozen=True)
class LowLatencyBarrierSpec(KernelSpec):
    """clean_low_latency_buffer's barrier (per peer, with deadlines; with enable_shrink a peer
    that misses it is masked), also run by destroy() with enable_shrink."""
    family: ClassVar[str] = "ll_barrier"
    headers: ClassVar[tuple[str, ...]] = ("ll_barrier.cuh",)
    entries: ClassVar[tuple[Entry, ...]] = (Entry("barrier", "ll_barrier_entry", A.LowLatencyBarrierArgs),)

    num_ranks: int
    threads: int = 64

    def validate(self):
        _check_common(self, hidden=False, topk=False, experts=False, ranks_max=MAX_RANK_SIG)
        self._req(self.threads % 32 == 0 and self.num_ranks <= self.threads <= 1024, "threads",
                  f"must be a multiple of 32 in [num_ranks={self.num_ranks}, 1024]")

    def readable_tag(self):
        return f"r{self.num_ranks}"


@functools.lru_cache(maxsize=1024)
def cached(cls: type, **fields) -> KernelSpec:
    """cls(**fields), built (and validated) once: the per-call path asks for the same few specs."""
    return cls(**fields)


# One builder per operation family: the spec a call needs, from the call's own parameters.
# The ops and the spec-file expansion behind `epgen precompile` (specfile.py) both ask here, so a
# precompiled cache holds exactly what the calls look up (EPGEN_JIT=0 deploys must not miss).
# Each returns the one validated instance (`cached`): the per-call path builds no object.
def layout_spec(num_ranks: int, num_experts: int, num_topk: int,
                ranks_per_node: int = 0) -> LayoutSpec:
    """get_dispatch_layout. num_topk 0 launches nothing, yet the op looks its kernel up before
    knowing: it is the top-k 1 kernel."""
    return cached(LayoutSpec, num_ranks=num_ranks, num_experts=num_experts,
                  num_topk=max(num_topk, 1), ranks_per_node=ranks_per_node)


def normal_dispatch_rows_spec(row_bytes: int, num_scale_cols: int, num_topk: int,
                              num_experts: int | None, num_ranks: int) -> "NormalDispatchSpec":
    """A normal dispatch of rows `row_bytes` wide with `num_scale_cols` scales (0: none): the
    kernel its wire shape is keyed by (normal_dispatch_wire, then normal_dispatch_spec)."""
    wire_hidden, wire_dtype = normal_dispatch_wire(row_bytes, num_scale_cols)
    return normal_dispatch_spec(wire_hidden, num_topk, num_experts, num_ranks, wire_dtype,
                                num_scale_cols if num_scale_cols else -1)


def normal_combine_spec(hidden: int, num_topk: int, num_ranks: int,
                        num_biases: int = 0) -> "NormalCombineSpec":
    return cached(NormalCombineSpec, hidden=hidden, num_topk=num_topk, num_ranks=num_ranks,
                  num_biases=num_biases)


def ll_dispatch_spec(hidden: int, num_topk: int, num_experts: int, num_ranks: int,
                     **format_fields) -> "LowLatencyDispatchSpec":
    """format_fields: formats.low_latency_fields of the format the dispatch sends."""
    return cached(LowLatencyDispatchSpec, hidden=hidden, num_topk=num_topk,
                  num_experts=num_experts, num_ranks=num_ranks, **format_fields)


def ll_combine_spec(hidden: int, num_topk: int, num_experts: int, num_ranks: int,
                    per_rank: bool = False, wire_format: str = "") -> "LowLatencyCombineSpec":
    """per_rank: the per-rank kernel (ops/low_latency.combine_runs_per_rank decides);
    wire_format: LL_COMBINE_FORMATS (formats.combine_fields)."""
    return cached(LowLatencyCombineRankSpec if per_rank else LowLatencyCombineSpec,
                  hidden=hidden, num_topk=num_topk, num_experts=num_experts,
                  num_ranks=num_ranks, wire_format=wire_format)


def ll_barrier_spec(num_ranks: int) -> "LowLatencyBarrierSpec":
    return cached(LowLatencyBarrierSpec, num_ranks=num_ranks)


def internode_notify_spec(num_ranks: int, ranks_per_node: int,
                          num_experts: int) -> "InternodeNotifySpec":
    return cached(InternodeNotifySpec, num_ranks=num_ranks, ranks_per_node=ranks_per_node,
                  num_experts=num_experts)


@dataclass(frozen=True)
class InternodeNotifySpec(KernelSpec):
    """The internode normal mode's counts exchange (NVSHMEM puts with signals to every rank)."""
    family: ClassVar[str] = "internode_notify"
    headers: ClassVar[tuple[str, ...]] = ("internode_notify.cuh",)
    entries: ClassVar[tuple[Entry, ...]] = (
        Entry("notify", "internode_notify_entry", A.InternodeNotifyArgs, min_blocks=None),)

    num_ranks: int
    ranks_per_node: int
    num_experts: int
    threads: int = 256

    def validate(self):
        _check_common(self, hidden=False, topk=False)
        L = self.ranks_per_node
        self._req(0 < L < self.num_ranks and self.num_ranks % L == 0, "ranks_per_node",
                  f"must divide num_ranks={self.num_ranks} and be below it (the ranks span nodes)")
        self._req(self.threads in (128, 256, 512) and self.threads >= self.num_ranks, "threads",
                  "must be 128, 256 or 512, and >= num_ranks")

    def derived(self):
        return dict(experts_per_rank=self.num_experts // self.num_ranks)

    def device_checks(self):
        El = self.num_experts // self.num_ranks
        return (("inotify::stage_off<{S}::num_ranks>()",
                 layout_facts.inode_notify_stage_off(self.num_ranks), "notify staging offset"),
                ("inotify::area_bytes<{S}::num_ranks, {S}::experts_per_rank>()",
                 layout_facts.inode_notify_area_bytes(self.num_ranks, El), "notify area size"))

    def readable_tag(self):
        return f"e{self.num_experts}_r{self.num_ranks}_n{self.num_ranks // self.ranks_per_node}"


def internode_dispatch_spec(row_bytes: int, num_scale_cols: int, num_topk: int, num_ranks: int,
                            ranks_per_node: int,
                            warps_per_block: int = 32) -> "InternodeDispatchSpec":
    """An internode dispatch of rows `row_bytes` wide with `num_scale_cols` 4-byte scales (0:
    none), keyed by its wire shape as the intranode dispatch (normal_dispatch_wire). Experts
    are a launch argument (only the local-expert arithmetic uses them). `warps_per_block`:
    variants.internode_warps_per_block."""
    hidden, dtype = normal_dispatch_wire(row_bytes, num_scale_cols)
    scale_cols = -1 if dtype != "fp8" or num_scale_cols == num_scales(hidden) else num_scale_cols
    return cached(InternodeDispatchSpec, hidden=hidden, num_topk=num_topk, num_ranks=num_ranks,
                  ranks_per_node=ranks_per_node, dtype=dtype, scale_cols=scale_cols,
                  warps_per_block=warps_per_block)


class _RolesOverBlocks:
    """A channel of the internode kernels: a warp per role, the roles spread evenly over as few
    blocks as hold them in `warps_per_block` warps each (one block up to 32 roles)."""

    def _check_roles(self):
        """The rules the dispatch and the combine share (a layout one of them refuses is of no
        use to the other)."""
        self._req(1 <= self.warps_per_block <= 32, "warps_per_block", "must be in [1, 32]")
        nodes = self.num_ranks // self.ranks_per_node
        self._req(nodes <= 32, "num_ranks",
                  f"with ranks_per_node={self.ranks_per_node} makes {nodes} nodes: at most 32 "
                  "(the combine's reducer keeps a node per lane)")

    @property
    def blocks_per_channel(self) -> int:
        return -(-self.roles // self.warps_per_block)

    @property
    def threads(self) -> int:
        return 32 * -(-self.roles // self.blocks_per_channel)

    def _blocks_tag(self) -> str:
        return "" if self.warps_per_block == 32 else f"_w{self.warps_per_block}"


@dataclass(frozen=True)
class InternodeDispatchSpec(_RolesOverBlocks, KernelSpec):
    """The internode normal mode's dispatch (templates/internode_dispatch.cuh): RDMA puts with
    signals between nodes, NVLink forwarding inside a node; per channel a warp per role (a
    sender per node, a forwarder per node, a receiver per source rank) over one or more blocks."""
    family: ClassVar[str] = "internode_dispatch"
    headers: ClassVar[tuple[str, ...]] = ("internode_dispatch.cuh",)
    entries: ClassVar[tuple[Entry, ...]] = (Entry("dispatch", "internode_dispatch_entry", A.InternodeDispatchArgs),)

    hidden: int
    num_topk: int          # 0: no top-k indices / weights
    num_ranks: int
    ranks_per_node: int
    dtype: str = "bf16"    # as NormalDispatchSpec: "bf16" rows of 2 * hidden bytes, "fp8" rows
    scale_cols: int = -1   # of hidden bytes with scale_cols 4-byte scales (-1: ceil(hidden / 128))
    warps_per_block: int = dataclasses.field(default=32, metadata=NEW_FIELD)

    def validate(self):
        _check_common(self, experts=False)
        L, R = self.ranks_per_node, self.num_ranks
        self._req(0 < L < R and R % L == 0, "ranks_per_node",
                  f"must divide num_ranks={R} and be below it (the ranks span nodes)")
        self._req(L <= 32, "ranks_per_node", "must be <= 32 (one source-meta word of local ranks)")
        self._req(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}")
        rule = 16 if self.dtype == "fp8" else 8
        self._req(self.hidden % rule == 0, "hidden",
                  f"must be a multiple of {rule} for {self.dtype} (16-byte rows)")
        if self.dtype == "fp8":
            self._req(self.scale_cols == -1 or 1 <= self.scale_cols <= MAX_SCALE_COLS,
                      "scale_cols", f"must be -1 (one per 128 channels) or in [1, {MAX_SCALE_COLS}]")
        else:
            self._req(self.scale_cols == -1, "scale_cols", "must be -1 (bf16 rows have no scales)")
        self._check_roles()

    @property
    def roles(self) -> int:
        """Warps a channel needs: a sender and a forwarder per node, a receiver per rank."""
        return 2 * (self.num_ranks // self.ranks_per_node) + self.num_ranks

    @property
    def num_scales(self) -> int:
        if self.dtype != "fp8":
            return 0
        return num_scales(self.hidden) if self.scale_cols < 0 else self.scale_cols

    @property
    def row_bytes(self) -> int:
        return self.hidden * (1 if self.dtype == "fp8" else 2)

    @property
    def record_bytes(self) -> int:
        return layout_facts.inode_dispatch_record_bytes(self.row_bytes, self.num_scales,
                                                        self.num_topk, self.ranks_per_node)

    def derived(self):
        return dict(threads=self.threads, row_bytes=self.row_bytes, num_scales=self.num_scales)

    def device_checks(self):
        cfg = ("IDispatchCfg<{S}::row_bytes, {S}::num_scales, {S}::num_topk, "
               "{S}::ranks_per_node, {S}::num_ranks>")
        return ((cfg + "::kRec", self.record_bytes,
                 "record bytes differ from inode_dispatch_record_bytes"),
                (cfg + "::kMetaBytes", layout_facts.inode_source_meta_bytes(self.ranks_per_node),
                 "source meta bytes (recv_src_meta's row) differ from inode_source_meta_bytes"))

    def readable_tag(self):
        return (f"{self.dtype}_h{self.hidden}_k{self.num_topk}_r{self.num_ranks}"
                f"_n{self.num_ranks // self.ranks_per_node}{self._blocks_tag()}")


def internode_combine_spec(hidden: int, num_topk: int, num_ranks: int, ranks_per_node: int,
                           num_biases: int = 0, warps_per_block: int = 32) -> "InternodeCombineSpec":
    return cached(InternodeCombineSpec, hidden=hidden, num_topk=num_topk, num_ranks=num_ranks,
                  ranks_per_node=ranks_per_node, num_biases=num_biases,
                  warps_per_block=warps_per_block)


@dataclass(frozen=True)
class InternodeCombineSpec(_RolesOverBlocks, KernelSpec):
    """The internode normal mode's combine (templates/internode_combine.cuh): BF16 rows back
    along the dispatch's path, summed inside each node first; per channel a warp per role (an
    NVLink sender per source rank, a forwarder per node, a reducer) over one or more blocks."""
    family: ClassVar[str] = "internode_combine"
    headers: ClassVar[tuple[str, ...]] = ("internode_combine.cuh",)
    entries: ClassVar[tuple[Entry, ...]] = (Entry("combine", "internode_combine_entry", A.InternodeCombineArgs),)

    hidden: int
    num_topk: int          # 0: no weights
    num_ranks: int
    ranks_per_node: int
    num_biases: int = 0
    warps_per_block: int = dataclasses.field(default=32, metadata=NEW_FIELD)

    def validate(self):
        _check_common(self, experts=False)
        L, R = self.ranks_per_node, self.num_ranks
        self._req(0 < L < R and R % L == 0, "ranks_per_node",
                  f"must divide num_ranks={R} and be below it (the ranks span nodes)")
        self._req(L <= 32, "ranks_per_node", "must be <= 32")
        self._req(self.hidden % 8 == 0, "hidden", "must be a multiple of 8 (16-byte BF16 rows)")
        self._req(self.num_biases in (0, 1, 2), "num_biases", "must be 0, 1 or 2")
        self._check_roles()

    @property
    def roles(self) -> int:
        """Warps a channel needs: a sender per rank, a forwarder per node, a reducer."""
        return self.num_ranks + self.num_ranks // self.ranks_per_node + 1

    def derived(self):
        return dict(threads=self.threads)

    def readable_tag(self):
        return (f"h{self.hidden}_k{self.num_topk}_r{self.num_ranks}"
                f"_n{self.num_ranks // self.ranks_per_node}_b{self.num_biases}{self._blocks_tag()}")


def spec_from_json(data: dict) -> KernelSpec:
    data = dict(data)
    family = data.pop("family")
    if family not in FAMILIES:
        raise SpecError("spec", "family", family, f"must be one of {sorted(FAMILIES)}")
    return FAMILIES[family](**data)
