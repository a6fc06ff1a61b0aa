"""epgen.formats: the registry and the checks dispatch runs before launch (CPU tensors: the
checks look at dtypes and shapes only)."""
import pytest
import torch

from epgen import formats as F
from epgen import reference as ref


def _x(fmt, T=3, H=2880):
    """(data, scales) of fmt as the reference quantizers make them."""
    b = torch.randn(T, H).to(torch.bfloat16)
    if fmt is F.BF16:
        return b, None
    if fmt is F.FP8_E4M3_F32_128:
        return ref.per_token_cast_to_fp8(b)
    if fmt is F.FP8_UE8M0_128:
        return ref.per_token_cast_to_fp8(b, round_scale=True, use_ue8m0=True)
    if fmt is F.MXFP8:
        q, s = ref.mxfp8_quantize(b)
        return q, ref.pack_scale_bytes(s)
    d, bs, g = ref.nvfp4_quantize(b)
    return d, ref.nvfp4_wire_scales(bs, g)


@pytest.mark.parametrize("name", sorted(F.FORMATS))
@pytest.mark.parametrize("H", [7168, 4096, 2880])
def test_reference_outputs_pass_their_format(name, H):
    fmt = F.get(name)
    data, scales = _x(fmt, H=H)
    assert fmt.check(data, scales) == H
    assert fmt.scale_cols(H) == (0 if scales is None else scales.shape[1])


def test_builtins_and_bytes_per_token():
    assert sorted(F.FORMATS) == ["bf16", "fp8_e4m3_f32_128", "fp8_ue8m0_128", "mxfp8", "nvfp4"]
    H = 7168
    assert [F.get(n).bytes_per_token(H) for n in ("bf16", "fp8_e4m3_f32_128", "fp8_ue8m0_128",
                                                  "mxfp8", "nvfp4")] == \
        [2 * H, H + 4 * 56, H + 4 * 14, H + 4 * 56, H // 2 + 4 * (112 + 1)]
    assert F.OPAQUE(7168, 64).bytes_per_token(123) == 7168 + 64
    assert F.get("opaque7168+64") == F.OPAQUE(7168, 64) and F.get("opaque512").side_bytes == 0
    assert F.get(F.MXFP8) is F.MXFP8


@pytest.mark.parametrize("bad", ["fp4", "opaque", "opaque12x", 7, "opaque100"])
def test_get_rejects_unknown_names(bad):
    with pytest.raises(ValueError, match="wire_format=|row_bytes=100"):
        F.get(bad)


def test_opaque_constructor_rules():
    with pytest.raises(F.FormatError, match="row_bytes=24: must be a positive multiple of 16"):
        F.OPAQUE(24)
    with pytest.raises(F.FormatError, match="side_bytes=6: must be a multiple of 4"):
        F.OPAQUE(32, 6)


@pytest.mark.parametrize("name, mutate, match", [
    ("fp8_e4m3_f32_128", lambda d, s: (d.view(torch.uint8), s),
     r"x\[0\].dtype=torch.uint8: must be torch.float8_e4m3fn for fp8_e4m3_f32_128"),
    ("fp8_e4m3_f32_128", lambda d, s: (d, s[:, :-1]),
     r"x\[1\].shape=\(3, 22\): fp8_e4m3_f32_128 at hidden 2880 has scales \[3, 23\]"),
    ("fp8_e4m3_f32_128", lambda d, s: (d, s.view(torch.int32)),
     r"x\[1\].dtype=torch.int32: must be torch.float32"),
    ("fp8_ue8m0_128", lambda d, s: (d, s.view(torch.float32)),
     r"x\[1\].dtype=torch.float32: must be torch.int32 for fp8_ue8m0_128 \(bytes_x4"),
    ("mxfp8", lambda d, s: (d[:, :2864], s),
     r"x\[0\].shape\[1\]=2864: mxfp8 needs a positive multiple of 32 channels"),
    ("mxfp8", lambda d, s: (d, None), r"x='a tensor': mxfp8 needs \(x, x_scales\)"),
    ("nvfp4", lambda d, s: (d, s[:, :-1]),
     r"x\[1\].shape=\(3, 45\): nvfp4 at hidden 2880 has scales \[3, 46\]"),
    ("nvfp4", lambda d, s: (d[:, :1432], s), r"x\[0\].shape\[1\]=1432: nvfp4 needs a positive "
                                              r"multiple of 32 channels \(2864 channels, 2 a byte\)"),
    ("bf16", lambda d, s: (d, torch.zeros(3, 1)), r"x\[1\]='a tensor': bf16 has no scales"),
    ("bf16", lambda d, s: (d.float(), s), r"x.dtype=torch.float32: must be torch.bfloat16"),
    ("nvfp4", lambda d, s: (d, s[:2]), r"x\[1\].shape=\(2, 46\): must be \[3, side width\]"),
])
def test_mismatches_name_the_argument_and_rule(name, mutate, match):
    fmt = F.get(name)
    data, scales = mutate(*_x(fmt))
    with pytest.raises(F.FormatError, match=match):
        fmt.check(data, scales)


def test_opaque_rows_of_any_element_type_with_a_side_row():
    fmt = F.OPAQUE(64, 8)
    assert fmt.check(torch.zeros(5, 16, dtype=torch.float32), torch.zeros(5, 4, dtype=torch.int16)) == 64
    with pytest.raises(F.FormatError, match=r"x\[0\].shape\[1\]=8: rows of 32 bytes; opaque64\+8"):
        fmt.check(torch.zeros(5, 8, dtype=torch.float32), torch.zeros(5, 2, dtype=torch.int32))
    with pytest.raises(F.FormatError, match=r"x\[1\].shape=\(5, 3\): opaque64\+8 at hidden 64 "
                                            r"has scales 8 bytes a row"):
        fmt.check(torch.zeros(5, 64, dtype=torch.uint8), torch.zeros(5, 3, dtype=torch.int32))
    with pytest.raises(F.FormatError, match=r"x\[1\].stride=\(1, 5\): side rows"):
        fmt.check(torch.zeros(5, 64, dtype=torch.uint8), torch.zeros(4, 5, dtype=torch.int16).t())
    assert F.OPAQUE(64).check(torch.zeros(5, 32, dtype=torch.int16), None) == 64


def test_low_latency_format_from_flags_or_wire_format():
    from epgen.ops.low_latency import _ll_format, payload_bytes
    assert _ll_format(None, True, False, False) is F.FP8_E4M3_F32_128
    assert _ll_format(None, True, True, True) is F.FP8_UE8M0_128
    assert _ll_format(None, False, False, False) is F.BF16
    for name in ("bf16", "mxfp8", "nvfp4", "fp8_ue8m0_128"):   # DeepEP's default flags
        assert _ll_format(name, True, False, False) is F.get(name)
    assert _ll_format("fp8_ue8m0_128", True, True, True) is F.FP8_UE8M0_128
    assert _ll_format("fp8_e4m3_f32_128", True, True, False) is F.FP8_E4M3_F32_128
    with pytest.raises(ValueError, match=r"wire_format='mxfp8': conflicts with use_fp8=False, "
                                         r"round_scale=False, use_ue8m0=False \(which name bf16\)"):
        _ll_format("mxfp8", False, False, False)
    assert _ll_format("opaque64", True, False, False) == F.OPAQUE(64)    # moved as bytes
    with pytest.raises(ValueError, match=r"wire_format='opaque64\+4': low-latency dispatch moves "
                                         r"opaque rows and side rows of multiples of 16 bytes"):
        _ll_format("opaque64+4", True, False, False)
    with pytest.raises(ValueError, match=r"wire_format='opaque64': conflicts with use_fp8=False"):
        _ll_format("opaque64", False, False, False)
    # payload = data + scale words, 16-byte padded (templates/ll_dispatch.cuh kPayload)
    assert payload_bytes(7168, False, "mxfp8") == 7168 + 4 * 224
    assert payload_bytes(2880, False, "nvfp4") == (1440 + 4 * 46 + 15) // 16 * 16
    assert payload_bytes(7168, True) == 7168 + 4 * 56


def _mismatches(fmt, d, s):
    """(name, (data, scales), expected message) for each way x can fail fmt's rules: data dtype,
    rank, width (the format's channel multiple, or a width its scales do not fit), scale shape,
    rows, dtype, scales missing or not a tensor."""
    T, name = d.shape[0], fmt.name
    dn = r"x\[0\]" if s is not None else "x"
    want = fmt.data_torch_dtype()
    other = torch.int8 if d.element_size() == 1 else torch.int16
    out = [("data dtype", (d.view(other), s), rf"{dn}\.dtype={other}: must be {want} for {name}"),
           ("data rank", (d[None], s), rf"{dn}\.shape=\(1, {T}, {d.shape[1]}\): must be "
                                       r"\[num_tokens, width\]")]
    if fmt.hidden_multiple > 1:       # a width that is not whole groups / packed bytes
        w = d.shape[1] - 8
        out.append(("width", (d[:, :w], s), rf"{dn}\.shape\[1\]={w}: {name} needs a positive "
                                            rf"multiple of {fmt.hidden_multiple} channels"
                                            + (r" \(\d+ channels, 2 a byte\)" if fmt.bits == 4 else "$")))
    if s is None:
        out.append(("extra scales", (d, torch.zeros(T, 1)),
                    rf"x\[1\]='a tensor': {name} has no scales: pass x alone"))
        return out
    H, c = fmt.hidden_of(d.shape[1]), s.shape[1]
    w = fmt.data_width(H - 512)        # 4 scale groups fewer: a width the scales do not fit
    out += [
        ("width vs scales", (d[:, :w], s), rf"x\[1\]\.shape=\({T}, {c}\): {name} at hidden "
                                          rf"{H - 512} has scales \[{T}, {fmt.scale_cols(H - 512)}\]"),
        ("scale columns", (d, s[:, :-1]), rf"x\[1\]\.shape=\({T}, {c - 1}\): {name} at hidden "
                                          rf"{H} has scales \[{T}, {c}\]"),
        ("scale rows", (d, s[:-1]), rf"x\[1\]\.shape=\({T - 1}, {c}\): must be \[{T}, side width\]"),
        ("scale dtype", (d, s.view(torch.float32 if s.dtype == torch.int32 else torch.int32)),
         rf"x\[1\]\.dtype=.*: must be {fmt.scale_torch_dtype()} for {name} "
         rf"\({fmt.scale_layout} scale layout\)"),
        ("scales missing", (d, None), rf"x='a tensor': {name} needs \(x, x_scales\)"),
        ("scales not a tensor", (d, s.tolist()), r"x\[1\]='list': must be a torch.Tensor"),
    ]
    return out


@pytest.mark.parametrize("name", sorted(F.FORMATS))
def test_every_builtin_format_names_each_mismatch(name):
    fmt = F.get(name)
    d, s = _x(fmt)
    cases = _mismatches(fmt, d, s)
    assert len(cases) >= (3 if s is None else 9) - (fmt.hidden_multiple == 1)
    for what, (data, scales), match in cases:
        with pytest.raises(F.FormatError, match=match):
            fmt.check(data, scales)
            pytest.fail(f"{name}: {what} passed the check")
