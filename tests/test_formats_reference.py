"""The wire-format quantizers of epgen.reference against an independent implementation
(ml_dtypes' e4m3 / e2m1 / e8m0 conversions, numpy arithmetic) and hand-computed cases. CPU only."""
import ml_dtypes
import numpy as np
import pytest
import torch

from epgen import reference as ref

FP8 = torch.float8_e4m3fn


def _e4m3_values():
    """Every finite non-negative e4m3 value, ascending."""
    v = np.arange(0, 0x7F, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    return np.sort(v)


def _boundaries(values):
    """Each representable value, each midpoint between neighbours and the float32 neighbours of
    each midpoint, with both signs: every point where round-to-nearest-even can go wrong."""
    mids = (values[1:] + values[:-1]) / 2
    pts = np.concatenate([values, mids, np.nextafter(mids, np.float32(np.inf)),
                          np.nextafter(mids, np.float32(-np.inf))]).astype(np.float32)
    return np.concatenate([pts, -pts])


def test_e4m3_rounding_at_every_boundary_matches_ml_dtypes():
    # Through mxfp8_quantize with a group exponent of 0 (an anchor of 300 in each group: amax in
    # [256, 512) gives X = floor(log2 amax) - 8 = 0), so the element is cast unscaled.
    pts = np.concatenate([_boundaries(_e4m3_values()), np.float32([448.0, 449.0, 463.9, 464.0,
                                                                    -470.0, 500.0])])
    n = len(pts)
    x = np.full((n, 32), 0, np.float32)
    x[:, 0] = 300.0
    x[:, 1] = pts
    q, s = ref.mxfp8_quantize(torch.from_numpy(x))
    assert torch.equal(s, torch.full_like(s, 127))
    expect = np.clip(pts, -448, 448).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    got = q[:, 1].view(torch.uint8).numpy()
    bad = np.nonzero(got != expect)[0]
    assert len(bad) == 0, f"e4m3 of {pts[bad[:4]]}: got {got[bad[:4]]}, expected {expect[bad[:4]]}"


def test_e2m1_rounding_at_every_boundary_matches_ml_dtypes():
    vals = np.float32(ref.E2M1_VALUES)
    pts = np.concatenate([_boundaries(vals), np.float32([0.0, -0.0, 6.5, 7.0, -100.0, 1e-30])])
    got = ref.e2m1_encode(torch.from_numpy(pts)).numpy()
    expect = np.clip(pts, -6, 6).astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0xF
    bad = np.nonzero(got != expect)[0]
    assert len(bad) == 0, f"e2m1 of {pts[bad[:4]]}: got {got[bad[:4]]}, expected {expect[bad[:4]]}"
    assert torch.equal(ref.e2m1_decode(torch.from_numpy(got)),
                       torch.from_numpy(expect.view(ml_dtypes.float4_e2m1fn).astype(np.float32)))


def _np_mxfp8(x):
    """Independent MXFP8: numpy log2 for the exponent, ml_dtypes for e8m0 and e4m3."""
    T, H = x.shape
    G = -(-H // 32)
    xp = np.zeros((T, G * 32), np.float32)
    xp[:, :H] = x
    amax = np.abs(xp.reshape(T, G, 32)).max(-1).astype(np.float64)
    with np.errstate(divide="ignore"):
        X = np.where(amax > 0, np.floor(np.log2(amax)) - 8, -127).clip(-127, 127)
    scale = np.exp2(X).astype(ml_dtypes.float8_e8m0fnu).view(np.uint8)
    v = (xp.astype(np.float64) / np.exp2(np.repeat(X, 32, axis=1))).astype(np.float32)
    q = np.clip(v, -448, 448).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)[:, :H]
    return q, scale


@pytest.mark.parametrize("H", [2880, 100])
def test_mxfp8_matches_independent_implementation(H):
    g = torch.Generator().manual_seed(H)
    mag = torch.exp2(torch.randint(-30, 30, (6, 1), generator=g).float())
    x = (torch.randn(6, H, generator=g) * mag).to(torch.bfloat16)
    x[0, :32] = 0                                  # an all-zero group
    x[1, :32] = 2.0 ** -133                        # bf16 subnormals: X = -141 clamps to -127
    x[2, 5] = 2.0 ** 20                            # an exact power of two as amax
    q, s = ref.mxfp8_quantize(x)
    nq, ns = _np_mxfp8(x.float().numpy())
    assert np.array_equal(s.numpy(), ns)
    assert np.array_equal(q.view(torch.uint8).numpy(), nq)
    assert s[0, 0] == 0 and s[2, 0] == 127 + 20 - 8


def test_mxfp8_e8m0_exponent_next_to_powers_of_two():
    for k in (-100, -9, 0, 1, 7, 100):
        below = np.nextafter(np.float32(2.0 ** k), np.float32(0))
        x = torch.zeros(2, 32)
        x[0, 3], x[1, 3] = 2.0 ** k, float(below)
        _, s = ref.mxfp8_quantize(x)
        assert s[:, 0].tolist() == [127 + k - 8, 127 + k - 9], k


def test_mxfp8_hand_case_and_dequantize():
    x = torch.zeros(1, 64)
    x[0, 0], x[0, 1], x[0, 32] = 1.0, -0.75, 3.0
    q, s = ref.mxfp8_quantize(x)
    assert s.tolist() == [[119, 120]]               # 2^-8 and 2^(1-8)
    assert q.view(torch.uint8)[0, :2].tolist() == [0x78, 0xF4]   # 256, -192
    assert torch.equal(ref.mxfp8_dequantize(q, s), x)


def _np_nvfp4(x, g):
    """Independent NVFP4: ml_dtypes for the e4m3 scales and the e2m1 values."""
    T, H = x.shape
    amax = np.abs(x.reshape(T, H // 16, 16)).max(-1)
    sf_f = (amax / np.float32(6)).astype(np.float32) * g[:, None]
    sf = np.minimum(sf_f, 448).astype(ml_dtypes.float8_e4m3fn)
    sf32 = sf.astype(np.float32)
    with np.errstate(divide="ignore"):
        q = np.where(sf32 != 0, g[:, None] / sf32, 0).astype(np.float32)
    v = (x * np.repeat(q, 16, axis=1)).astype(np.float32)
    codes = np.clip(v, -6, 6).astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0xF
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return packed, sf.view(np.uint8)


def test_nvfp4_matches_independent_implementation():
    g = torch.Generator().manual_seed(4)
    mag = torch.exp2(torch.randint(-20, 20, (5, 1), generator=g).float())
    x = (torch.randn(5, 2880, generator=g) * mag).to(torch.bfloat16)
    x[0, :16] = 0
    d, b, gs = ref.nvfp4_quantize(x)
    xf = x.float().numpy()
    expect_g = np.float32(448 * 6) / np.maximum(np.abs(xf).max(-1), np.float32(1e-4))
    assert np.array_equal(gs.numpy(), expect_g.astype(np.float32))
    nd, nb = _np_nvfp4(xf, gs.numpy())
    assert np.array_equal(b.numpy(), nb)
    assert np.array_equal(d.numpy(), nd)
    # A caller's global scale is used as given.
    d1, b1, g1 = ref.nvfp4_quantize(x, torch.tensor(3.0))
    nd1, nb1 = _np_nvfp4(xf, np.full(5, 3.0, np.float32))
    assert torch.equal(g1, torch.full((5,), 3.0)) and np.array_equal(d1.numpy(), nd1)


def test_nvfp4_hand_case_packing_and_wire_scales():
    x = torch.zeros(1, 32)
    x[0, :4] = torch.tensor([6.0, 3.0, -1.5, 0.0])
    x[0, 16] = 0.5
    d, b, g = ref.nvfp4_quantize(x, torch.tensor([1.0]))
    assert b.tolist() == [[0x38, 0x1B]]               # e4m3 1.0; 0.5 / 6 rounds to 2^-4 * 1.375
    assert d[0, :2].tolist() == [0x57, 0x0B]          # codes 7, 5 | 0xB, 0: low nibble first
    d, b, g = ref.nvfp4_quantize(x[:, :16])           # default global scale: 448 * 6 / 6
    assert g.tolist() == [448.0] and b.tolist() == [[0x7E]] and d[0, :2].tolist() == [0x57, 0x0B]
    assert torch.equal(ref.nvfp4_dequantize(d, b, g), x[:, :16])
    w = ref.nvfp4_wire_scales(b, g)
    assert w.dtype == torch.int32 and w.shape == (1, 2)
    bb, gg = ref.nvfp4_split_wire_scales(w, 16)
    assert torch.equal(bb, b) and torch.equal(gg, g)


def test_nvfp4_error_bound():
    """The stated NVFP4 error: |err| <= 0.25 * |x| + 0.25 * sf / g per element (half an e2m1
    step: relative 1/4 at worst among normals, 0.25 units of sf / g near zero; saturation at 6
    after the e4m3 rounding of sf costs at most 1/16)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(8, 256, generator=g).to(torch.bfloat16)
    d, b, gs = ref.nvfp4_quantize(x)
    y = ref.nvfp4_dequantize(d, b, gs)
    sf = b.view(FP8).float().repeat_interleave(16, dim=-1) / gs.unsqueeze(-1)
    assert bool(((y - x.float()).abs() <= 0.25 * x.float().abs() + 0.25 * sf).all())


@pytest.mark.parametrize("H", [7168, 4096, 2880])
def test_fp8_per_128_float_scales_match_independent_implementation(H):
    """DeepEP's FP8 (e4m3, float32 scale_inv per 128 channels; 2880: a partial last group of
    64), in numpy and ml_dtypes: amax clamped at 1e-4, scale_inv = amax / 448, the row times
    1 / scale_inv clamped to +-448 and rounded to e4m3; with round_scale, scale_inv rounded up
    to a power of two. Bit for bit, on rows with tiny and huge groups."""
    g = torch.Generator().manual_seed(H)
    x = (torch.randn(9, H, generator=g) * torch.logspace(-6, 4, 9).unsqueeze(1)).to(torch.bfloat16)
    x[0, :128] = 0                                          # an all-zero group: amax clamps
    xf = x.float().numpy()
    S = -(-H // 128)
    padded = np.pad(np.abs(xf), ((0, 0), (0, S * 128 - H)))
    amax = np.maximum(padded.reshape(9, S, 128).max(axis=-1), np.float32(1e-4))
    for round_scale in (False, True):
        scale_inv = (amax / np.float32(448.0)).astype(np.float32)
        if round_scale:
            scale_inv = np.exp2(np.ceil(np.log2(scale_inv.astype(np.float64)))).astype(np.float32)
        scale = (np.float32(1.0) / scale_inv).astype(np.float32)
        y = np.clip(xf * np.repeat(scale, 128, axis=1)[:, :H], -448, 448).astype(np.float32)
        q_exp = y.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
        q, got_scale_inv = ref.per_token_cast_to_fp8(x, round_scale=round_scale)
        assert np.array_equal(got_scale_inv.numpy(), scale_inv), f"round_scale={round_scale}"
        assert np.array_equal(q.view(torch.uint8).numpy(), q_exp), f"round_scale={round_scale}"


def test_fp8_cast_against_deepeps_kernel_formula():
    """DeepEP's low-latency kernel (567632d, calculate_fp8_scales) takes scale_inv = amax *
    float32(1 / 448) and multiplies by 448 / amax; epgen divides once (amax / 448) and
    multiplies by the reciprocal of that. The difference, stated in README "Differences from
    DeepEP V1": scale_inv at most one float32 ulp apart, values at most one e4m3 step apart, in
    well under 0.1 % of the elements (review R10)."""
    g = torch.Generator().manual_seed(10)
    x = (torch.randn(512, 7168, generator=g) * torch.logspace(-4, 3, 512).unsqueeze(1)).to(
        torch.bfloat16)
    q, scale_inv = ref.per_token_cast_to_fp8(x)
    xf = x.float().numpy()
    amax = np.maximum(np.abs(xf).reshape(512, 56, 128).max(axis=-1), np.float32(1e-4))
    deepep_scale_inv = (amax * np.float32(1.0 / 448.0)).astype(np.float32)
    deepep_q = np.clip(xf * np.repeat((np.float32(448.0) / amax).astype(np.float32), 128, axis=1),
                       -448, 448).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    ulps = np.abs(deepep_scale_inv.view(np.int32) - scale_inv.numpy().view(np.int32))
    steps = np.abs(deepep_q.astype(np.int32) - q.view(torch.uint8).numpy().astype(np.int32))
    assert ulps.max() <= 1 and steps.max() <= 1
    assert 0 < (steps > 0).mean() < 1e-3, (steps > 0).mean()


def test_ue8m0_packing_matches_ml_dtypes():
    x = torch.randn(3, 1000).to(torch.bfloat16)
    q, packed = ref.per_token_cast_to_fp8(x, round_scale=True, use_ue8m0=True)
    _, scale_inv = ref.per_token_cast_to_fp8(x, round_scale=True)
    bytes_ = scale_inv.numpy().astype(ml_dtypes.float8_e8m0fnu).view(np.uint8)
    assert np.array_equal(ref.unpack_scale_bytes(packed, 8).numpy(), bytes_)
    assert torch.equal(ref.pack_scale_bytes(torch.from_numpy(bytes_)), packed)


# ----------------------------------------------------------------------------------------------
# LogFMT-10
# ----------------------------------------------------------------------------------------------
def test_logfmt_hand_case_bytes():
    x = torch.zeros(1, 512)
    x[0, 0], x[0, 1] = 0.5, -(2.0 ** -11)            # amax 2^-1, amin 0 -> log range [-33, -1]
    x[0, 1::2] = -(2.0 ** -11)
    x[0, 128:] = 0.25                                 # groups 1..3: amin == amax: not encodable
    m = ref.logfmt_encode(x.to(torch.bfloat16))
    assert m.cast.tolist() == [[False]]               # one chunk of 512: needs every group
    assert m.num_bytes.tolist() == [16 + 1024]
    assert torch.equal(m.payload[0, 16:16 + 1024], x.to(torch.bfloat16).view(torch.uint8)[0])
    x[0, 128:] = 0.25 * (torch.arange(384) % 2)       # now every group has amin 0 < amax
    m = ref.logfmt_encode(x.to(torch.bfloat16))
    assert m.cast.tolist() == [[True]] and m.num_bytes.tolist() == [16 + 512 // 16 * 20]
    meta = m.payload[0, :16].view(torch.bfloat16).float().view(4, 2)
    assert meta[0].tolist() == [0.5, 0.0] and meta[1].tolist() == [0.25, 0.0]
    blk = m.payload[0, 16:36].tolist()
    # Group 0: log_amax = -1, log_amin = -33 (clip), step = 32 / 510: 0.5 -> code 511;
    # 2^-11 -> floor(22 * 510 / 32 + 1.5...) = 352; value 2 is 0 -> code 0.
    codes = [511] + [352, 0] * 7 + [352]              # odd channels hold -2^-11
    bits = sum(c << (9 * j) for j, c in enumerate(codes)) | (0xAAAA << 144)
    assert blk == list(bits.to_bytes(20, "little")), blk
    y = ref.logfmt_decode(m, 512)
    assert y[0, 2] == 0 and y[0, 1] < 0
    assert torch.allclose(y[0, :4], x[0, :4], rtol=2 ** -5)


def test_logfmt_chunks_and_hidden_rule():
    assert ref.logfmt_chunk(7168) == 1024 and ref.logfmt_chunk(2560) == 512
    assert ref.logfmt_chunk(2880) == 512              # epgen's extension: partial last chunk
    with pytest.raises(ValueError, match="hidden % 16"):
        ref.logfmt_chunk(2888)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 2048, generator=g) * 0.05).to(torch.bfloat16)
    x[1, 1030] = 1.0                                  # amax >= 1 in chunk 1 of token 1
    m = ref.logfmt_encode(x)
    assert m.cast.tolist() == [[True, True], [True, False]]
    y = ref.logfmt_decode(m, 2048)
    assert torch.equal(y[1, 1024:], x[1, 1024:].float())   # BF16 chunk: exact


def test_logfmt_error_bound():
    """Encoded values at or above the group's clipped amin decode within a factor
    2^(step/2) (plus float32 rounding) of the bf16 input; step = (log_amax - log_amin) / 510
    <= 32 / 510, so the relative error is below 2.2 %."""
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(4, 1024, generator=g) * torch.rand(4, 1, generator=g) * 0.2)
    x = x.clamp(-0.99, 0.99).to(torch.bfloat16)
    m = ref.logfmt_encode(x)
    assert bool(m.cast.all())
    y = ref.logfmt_decode(m, 1024)
    meta = m.meta.float()
    la, lm, _ = ref._logfmt_log_range(m.meta)
    step = ((la - lm) / 510).repeat_interleave(128, dim=-1)
    xf = x.float()
    keep = xf.abs() >= torch.exp2(lm).repeat_interleave(128, dim=-1)
    rel = ((y - xf).abs() / xf.abs())[keep]
    bound = (torch.exp2(step / 2) - 1)[keep] + 2e-5
    assert bool((rel <= bound).all()), (rel - bound).max()
    assert bool((torch.sign(y) == torch.sign(xf))[keep].all()) and meta.shape == (4, 8, 2)


def test_logfmt_log2_of_every_bf16_magnitude_within_one_ulp():
    # e + float32(log2(1 + m/128)): the table entry's rounding (<= 2^-25, entries below 1) plus
    # the sum's (<= half an ulp of the result).
    m = torch.arange(1, 0x7F80, dtype=torch.int32)               # every finite nonzero magnitude
    got = ref.logfmt_log2_bf16(m).numpy().astype(np.float64)
    true = np.log2(m.to(torch.int16).view(torch.bfloat16).double().numpy())
    ulp = np.spacing(np.abs(got).astype(np.float32)).astype(np.float64)
    assert np.all(np.abs(got - true) <= ulp / 2 + 2.0 ** -25)
    assert ref.logfmt_log2_bf16(torch.tensor([0])).item() == float("-inf")


def test_logfmt_exp2_and_log2_near1_accuracy():
    g = torch.Generator().manual_seed(3)
    v = torch.cat([torch.linspace(-126, 0, 20001), torch.rand(20000, generator=g) * -40,
                   torch.tensor([0.5, -0.5, 1.5, -125.5])])
    got = ref.logfmt_exp2(v).double().numpy()
    true = np.exp2(v.double().numpy())
    assert np.all(np.abs(got - true) <= 4 * 2.0 ** -24 * true)
    sub = torch.tensor([-130.0, -140.25, -149.0, -151.0, -400.0])   # subnormal results, then 0
    assert ref.logfmt_exp2(sub).tolist()[3:] == [0.0, 0.0]
    assert np.allclose(ref.logfmt_exp2(sub[:3]).double().numpy(), np.exp2(sub[:3].double().numpy()),
                       rtol=2 ** -20, atol=2.0 ** -150)      # one rounding into the subnormals
    y = 1 + torch.rand(20000, generator=g) / 32
    got = ref.logfmt_log2_near1(y).double().numpy()
    true = np.log2(y.double().numpy())
    assert np.all(np.abs(got - true) <= 4 * 2.0 ** -24 * np.abs(true) + 2.0 ** -40)


def _deepep_codes_float64(x):
    """DeepEP's logfmt_encode formulas in float64 (no lg2.approx / float32 rounding), from the
    bf16 magnitudes: an independent statement of the code of each value of an encodable group."""
    xa = np.abs(x.float().numpy().astype(np.float64)).reshape(x.shape[0], -1, 128)
    amax, amin = xa.max(-1, keepdims=True), xa.min(-1, keepdims=True)
    la = np.log2(amax)
    with np.errstate(divide="ignore"):
        lm = np.where(amin == 0, la - 32, np.maximum(np.log2(amin), la - 32))
        step = (la - lm) / 510
        rounding = 2 - np.log2((1 + np.exp2(step)) * 0.5) / step
        t = np.log2(xa) / step + rounding - lm / step
    return np.floor(np.maximum(t, 0)).reshape(x.shape[0], -1)


def test_logfmt_codes_match_deepeps_formula_up_to_float32_rounding():
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(8, 1024, generator=g) * torch.rand(8, 1, generator=g) * 0.2)
    x = x.clamp(-0.99, 0.99).to(torch.bfloat16)
    m = ref.logfmt_encode(x)
    assert bool(m.cast.all())
    blk = m.payload[:, 32:32 + 1280].reshape(8, -1, 20).to(torch.int64)
    bits = ((blk.unsqueeze(-1) >> torch.arange(8)) & 1).flatten(-2)
    codes = (bits[..., :144].reshape(8, -1, 16, 9) << torch.arange(9)).sum(-1).reshape(8, -1)
    signs = bits[..., 144:].reshape(8, -1)
    want = _deepep_codes_float64(x)
    diff = np.abs(codes.numpy() - want)
    assert diff.max() <= 1 and (diff == 0).mean() > 0.999, ((diff != 0).sum(), diff.max())
    assert torch.equal(signs, torch.signbit(x.float()).to(torch.int64))


def test_logfmt_partial_last_group_and_chunk_hand_case():
    # hidden 2880: 23 groups (the last of 64 channels), chunks of 512 and a last of 320.
    x = torch.tensor([0.25, 0.0] * 1440).view(1, 2880)
    m = ref.logfmt_encode(x.to(torch.bfloat16))
    assert m.meta.shape == (1, 23, 2) and m.cast.tolist() == [[True] * 6]
    assert m.num_bytes.tolist() == [4 * 23 + 5 * 640 + 320 // 16 * 20]
    x[0, 2879] = 1.5                                  # the 64-channel group: amax >= 1
    xb = x.to(torch.bfloat16)
    m = ref.logfmt_encode(xb)
    assert m.cast.tolist() == [[True] * 5 + [False]]
    assert m.meta[0, 22].float().tolist() == [1.5, 0.0]
    n = 4 * 23 + 5 * 640
    assert m.num_bytes.tolist() == [n + 640]
    assert torch.equal(m.payload[0, n:n + 640], xb.view(torch.uint8)[0, 2 * 2560:])
    y = ref.logfmt_decode(m, 2880)
    assert torch.equal(y[0, 2560:], xb.float()[0, 2560:])
    assert torch.equal(y[0, :2560], xb.float()[0, :2560])  # 0.25 = amax and 0: exact


def test_fp8_combine_message_against_ml_dtypes():
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(3, 2880, generator=g) * 3).to(torch.bfloat16)
    payload, n = ref.combine_wire_encode(x, "fp8_e4m3_f32_128")
    assert n.tolist() == [2880 + 4 * 23] * 3 and payload.shape[1] == (2880 + 92 + 15) // 16 * 16
    q = payload[:, :2880].numpy().view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    s = payload[:, 2880:2880 + 92].contiguous().view(torch.float32).numpy()
    want = q * np.repeat(s, 128, axis=1)[:, :2880]               # float32 multiply, rounded
    got = ref.combine_wire_values(x, "fp8_e4m3_f32_128").numpy()
    assert np.array_equal(got, want)
    amax = np.abs(x.float().numpy()).reshape(3, -1)[:, 2816:].max(-1)   # the partial group
    assert np.array_equal(s[:, 22], (np.maximum(amax, np.float32(1e-4)) / np.float32(448))
                          .astype(np.float32))


def test_combine_wire_bf16_is_the_row():
    x = torch.randn(2, 256).to(torch.bfloat16)
    payload, n = ref.combine_wire_encode(x, "bf16")
    assert torch.equal(payload, x.view(torch.uint8)) and n.tolist() == [512, 512]
    assert torch.equal(ref.combine_wire_values(x, "bf16"), x.float())
    with pytest.raises(ValueError, match="wire_format='fp4'"):
        ref.combine_wire_values(x, "fp4")


# ----------------------------------------------------------------------------------------------
# Low-latency dispatch of the new formats: the golden model and its checker
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["mxfp8", "nvfp4"])
def test_ll_dispatch_reference_and_checker(fmt):
    R, E, M, H = 2, 4, 4, 64
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(3, H, generator=g).to(torch.bfloat16) for _ in range(R)]
    idxs = [torch.tensor([[0, 2], [1, -1], [3, 0]]), torch.tensor([[2, 1], [-1, -1], [0, 3]])]
    res = ref.low_latency_dispatch(xs, idxs, E, 0, M, wire_format=fmt)
    q, s = ref.ll_cast(xs[0][0:1], wire_format=fmt)
    assert res.recv_x.dtype == q.dtype and res.recv_x.shape[-1] == q.shape[-1]
    assert torch.equal(ref._as_bytes(res.recv_x[0, 0:1]), ref._as_bytes(q))   # expert 0, token 0
    assert torch.equal(res.recv_x_scales[0, 0:1], s)
    assert res.recv_x_scales.shape[-1] == (1 if fmt == "mxfp8" else 2)   # ceil(2/4); ceil(4/4) + 1
    ref.check_low_latency_dispatch(xs, idxs, E, 0, M, res.recv_x, res.recv_count,
                                   res.recv_src_info, res.recv_layout_range,
                                   recv_x_scales=res.recv_x_scales, wire_format=fmt)
    bad = ref._as_bytes(res.recv_x).clone()
    bad[0, 0, 5] ^= 1
    with pytest.raises(AssertionError, match=f"{fmt} bytes differ"):
        ref.check_low_latency_dispatch(xs, idxs, E, 0, M, bad.view(res.recv_x.dtype),
                                       res.recv_count, res.recv_src_info, res.recv_layout_range,
                                       recv_x_scales=res.recv_x_scales, wire_format=fmt)
    with pytest.raises(ValueError, match="wire_format='fp4'"):
        ref.ll_cast(xs[0], wire_format="fp4")
