"""The combine wire formats' device code (templates/ll_combine_wire.cuh), built for the host (a
warp as 32 threads, tests/host/wire_host.cpp), against epgen.reference bit for bit: message
bytes and decoded float32 values. CPU only; needs a C++20 compiler (g++), skipped without one."""
import os
import re
import struct
import subprocess

import pytest
import torch

from epgen import reference as ref
from tests import host_build

HERE = os.path.dirname(__file__)
HEADER = os.path.join(HERE, "..", "epgen", "jit", "templates", "ll_combine_wire.cuh")


@pytest.fixture(scope="module")
def wire_host(tmp_path_factory):
    return host_build.build(tmp_path_factory, "wire_host.cpp", "ll_combine_wire.cuh",
                            "-std=c++20", "-O1", "-ffp-contract=off", "-pthread")


def _run(exe, x, fmt=2):
    T, H = x.shape
    inp = f"{fmt} {H} {T}\n".encode() + x.contiguous().view(torch.int16).numpy().tobytes()
    lines = subprocess.run([exe], input=inp, capture_output=True, check=True).stdout.split(b"\n")
    out = []
    for t in range(T):
        msg = list(map(int, lines[2 * t].split()))
        vals = torch.tensor([int(v) for v in lines[2 * t + 1].split()], dtype=torch.int64)
        out.append((msg[0], bytes(msg[1:]), vals.to(torch.int32)))   # wraps to the bit pattern
    return out


def _rows(H, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, H, generator=g) * 0.1
    x[1] *= 30                                   # no chunk encodable
    x[2, :128] = 0                               # a zero group: its chunk goes as BF16
    x[3, ::3] = 1e-39                            # bf16 subnormals (the 2^-32 clip)
    x[4, min(700, H - 1)] = 2.0                  # one chunk with amax >= 1
    x[5] *= torch.rand(H, generator=g) ** 8      # wide ranges
    return x.to(torch.bfloat16)


@pytest.mark.parametrize("H", [512, 2880, 4096, 7168])
def test_device_logfmt_matches_reference(wire_host, H):
    x = _rows(H, H)
    m = ref.logfmt_encode(x)
    # the harness adds each value with weight 1 to a +0 accumulator, as the receive does (-0 -> +0)
    dec = torch.zeros(H) + torch.ones(H) * ref.logfmt_decode(m, H)
    assert m.cast.any() and not m.cast.all()
    for t, (n, msg, vals) in enumerate(_run(wire_host, x)):
        assert n == int(m.num_bytes[t]), (t, n)
        assert msg == bytes(m.payload[t, :n].tolist()), f"row {t}: message bytes differ"
        assert torch.equal(vals, dec[t].view(torch.int32)), f"row {t}: decoded values differ"


def _header_array(name):
    body = re.search(name + r"\[\d+\] = \{([^}]*)\}", open(HEADER).read()).group(1)
    return [int(v, 16) for v in re.findall(r"0x([0-9a-f]+)u", body)]


def test_header_constants_are_the_reference_definitions():
    bits = lambda vs: [struct.unpack("<I", struct.pack("<f", v))[0] for v in vs]  # noqa: E731
    assert _header_array("kLog2_1pM") == bits(ref.LOG2_1P_M)
    assert _header_array("kExp2Poly") == bits(ref.EXP2_POLY)
    assert _header_array("kLog2_1pPoly") == bits(ref.LOG2_1P_POLY)


@pytest.mark.parametrize("H", [2880, 7168])
def test_device_fp8_matches_reference(wire_host, H):
    x = _rows(H, H + 1)
    x[0, 5] = 3e4                                 # a group whose small values flush to zero
    want, nbytes = ref.combine_wire_encode(x, "fp8_e4m3_f32_128")
    vals_want = ref.combine_wire_values(x, "fp8_e4m3_f32_128")
    for t, (n, msg, vals) in enumerate(_run(wire_host, x, fmt=1)):
        assert n == int(nbytes[t]) == H + 4 * ((H + 127) // 128)
        assert msg == bytes(want[t, :n].tolist()), f"row {t}: message bytes differ"
        assert torch.equal(vals, vals_want[t].view(torch.int32)), f"row {t}: values differ"
