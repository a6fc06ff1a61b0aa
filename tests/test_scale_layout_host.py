"""Received-scale layouts of low-latency dispatch (formats.RECV_SCALE_LAYOUTS): the device's index
map (templates/ll_scale_layout.cuh, built for the host by tests/host/scale_layout_host.cpp)
against reference.scale_word_offsets, and that reference against independent statements of the
layouts: torchao's to_blocked (CUTLASS / cuBLAS 128x4 scale tiles) and DeepGEMM's TMA-aligned
MN-major strides. CPU only; the host build needs a C++ compiler (g++), skipped without one."""
import subprocess

import pytest
import torch

from epgen import reference as ref
from epgen.jit.specs import LL_SCALE_LAYOUTS
from tests import host_build

LAYOUTS = ("deepep", "deepgemm", "cutlass_128x4")     # LL_SCALE_LAYOUTS' order (codes 0, 1, 2)
SHAPES = [(1, 1, 1), (2, 66, 3), (3, 130, 5), (2, 256, 2), (1, 33, 23)]


@pytest.fixture(scope="module")
def layout_host(tmp_path_factory):
    return host_build.build(tmp_path_factory, "scale_layout_host.cpp", "ll_scale_layout.cuh",
                            "-std=c++17", "-O1")


def test_layout_names_match_the_spec_codes():
    assert LL_SCALE_LAYOUTS == ("",) + LAYOUTS[1:]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_device_map_matches_reference(layout_host, layout):
    code = LAYOUTS.index(layout)
    inp = "".join(f"{code} {E} {RM} {W}\n" for E, RM, W in SHAPES)
    lines = subprocess.run([layout_host], input=inp.encode(), capture_output=True,
                           check=True).stdout.decode().splitlines()
    assert len(lines) == len(SHAPES)
    for (E, RM, W), line in zip(SHAPES, lines):
        got = [int(v) for v in line.split()]
        assert got[0] == ref.scale_layout_words(layout, E, RM, W), (layout, E, RM, W)
        exp = ref.scale_word_offsets(layout, E, RM, W).flatten().tolist()
        assert got[1:] == exp, (layout, E, RM, W)


@pytest.mark.parametrize("E,RM,W", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_word_has_its_own_place(layout, E, RM, W):
    off = ref.scale_word_offsets(layout, E, RM, W).flatten()
    assert off.unique().numel() == off.numel()
    assert int(off.min()) >= 0 and int(off.max()) < ref.scale_layout_words(layout, E, RM, W)
    words = torch.arange(E * RM * W, dtype=torch.int32).view(E, RM, W)
    assert torch.equal(ref.scales_from_layout(ref.scales_to_layout(words, layout), layout,
                                              E, RM, W), words)


@pytest.mark.parametrize("E,RM,W", SHAPES)
def test_mn_major_layouts_are_deepeps_and_deepgemms_strides(E, RM, W):
    # deepep: DeepEP's torch.empty(E, W, RM).transpose(1, 2); deepgemm: DeepGEMM's
    # get_mn_major_tma_aligned_tensor output, empty_strided((E, RM, W), (RM4 * W, 1, RM4)) with
    # RM4 = get_tma_aligned_size(RM, 4) (16-byte alignment: a multiple of 4 words).
    words = torch.randint(-2**31, 2**31 - 1, (E, RM, W), dtype=torch.int32)
    for layout, rows in (("deepep", RM), ("deepgemm", (RM + 3) // 4 * 4)):
        store = ref.scales_to_layout(words, layout)
        view = torch.as_strided(store, (E, RM, W), (rows * W, 1, rows))
        assert torch.equal(view, words), layout


@pytest.mark.parametrize("M,n", [(1, 1), (66, 9), (128, 4), (130, 5), (256, 448), (300, 180)])
def test_cutlass_128x4_matches_torchao_to_blocked(M, n):
    torchao_utils = pytest.importorskip("torchao.prototype.mx_formats.utils")
    sf = torch.randint(0, 256, (M, n), dtype=torch.uint8)
    assert torch.equal(ref.swizzle_128x4(sf), torchao_utils.to_blocked(sf))


def test_cutlass_128x4_hand_case():
    # TensorRT-LLM's get_sf_out_offset_128x4 by hand: row m, column k of a 130 x 5 matrix sits at
    # byte ((m // 128) * ceil(5 / 4) + k // 4) * 512 + (m % 32) * 16 + ((m % 128) // 32) * 4 + k % 4.
    sf = torch.zeros(130, 5, dtype=torch.uint8)
    for (m, k, v) in ((0, 0, 1), (1, 0, 2), (32, 0, 3), (0, 3, 4), (0, 4, 5), (129, 4, 6),
                      (127, 2, 7)):
        sf[m, k] = v
    out = ref.swizzle_128x4(sf)
    assert out.numel() == 256 * 8
    at = {int(i): int(out[i]) for i in torch.nonzero(out).flatten()}
    assert at == {0: 1, 16: 2, 4: 3, 3: 4, 512: 5, 1024 + 512 + 16: 6, 31 * 16 + 12 + 2: 7}
