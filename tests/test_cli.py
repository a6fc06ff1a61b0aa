"""The `epgen` command: precompile (spec files and their errors), cache ls/inspect/clear/gc/
export/import, doctor."""
import os
import subprocess
import sys

import pytest

from epgen import jit
from epgen.cli import main
from epgen.specfile import SpecFileError, load_spec_file
from epgen.jit.specs import (LayoutSpec, LowLatencyBarrierSpec, LowLatencyCombineSpec,
                             LowLatencyDispatchSpec, NormalDispatchSpec)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = """
arch: sm_90
kernels:
  - {family: layout, num_ranks: 2, num_experts: 64, num_topk: 4}
  - {family: layout, num_ranks: 4, num_experts: 64, num_topk: 8}
"""


def write(tmp_path, text, name="spec.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_bundled_deepseek_spec_expands_to_the_kernel_set():
    sf = load_spec_file(os.path.join(ROOT, "examples", "deepseek-v3.yaml"))
    assert sf.arch == "sm_90"
    ranks = {s.num_ranks for s in sf.specs}
    assert ranks == {2, 4, 8, 16}
    assert {s.family for s in sf.specs if s.num_ranks == 16} == {
        "layout", "internode_notify", "internode_dispatch", "internode_combine", "ll_dispatch",
        "ll_combine", "ll_barrier"}                          # EP16: two nodes of 8
    assert LayoutSpec(num_ranks=8, num_experts=256, num_topk=8) in sf.specs
    assert NormalDispatchSpec(hidden=7168, num_topk=8, num_experts=256, num_ranks=4,
                              dtype="fp8") in sf.specs
    assert LowLatencyDispatchSpec(hidden=7168, num_topk=8, num_experts=256, num_ranks=2,
                                  use_fp8=False) in sf.specs
    assert LowLatencyBarrierSpec(num_ranks=8) in sf.specs     # clean_low_latency_buffer
    assert len(sf.specs) == len(set(sf.specs))


def test_spec_files_name_wire_formats(tmp_path):
    """Normal-mode dtypes may be any wire format (keyed as the bytes they move, so MXFP8 rows
    share FP8's kernel); low-latency dtypes the formats its dispatch casts to."""
    sf = load_spec_file(write(tmp_path, """
models:
  - {name: m, hidden: 2880, num_experts: 64, num_topk: 4, ep_sizes: [2],
     modes: {normal: {dtypes: [mxfp8, nvfp4, opaque2048+12]},
             low_latency: {dispatch_dtypes: [mxfp8, nvfp4, fp8_ue8m0_128, opaque2880+64]}}}
"""))
    nd = lambda **kw: NormalDispatchSpec(num_topk=4, num_experts=64, num_ranks=2, **kw)  # noqa: E731
    ld = lambda **kw: LowLatencyDispatchSpec(hidden=2880, num_topk=4, num_experts=64,  # noqa: E731
                                             num_ranks=2, **kw)
    assert nd(hidden=2880, dtype="fp8") in sf.specs                       # mxfp8: FP8's kernel
    assert nd(hidden=1440, dtype="fp8", scale_cols=46) in sf.specs        # nvfp4
    assert nd(hidden=2048, dtype="fp8", scale_cols=3) in sf.specs         # opaque + 12 bytes
    assert ld(use_fp8=False, wire_format="mxfp8") in sf.specs
    assert ld(use_fp8=False, wire_format="nvfp4") in sf.specs
    assert ld(round_scale=True, use_ue8m0=True) in sf.specs
    assert ld(use_fp8=False, wire_format="opaque2880+64") in sf.specs     # moved as bytes


def test_spec_files_name_combine_formats_and_scale_layouts(tmp_path):
    """Low-latency combine_dtypes (formats.COMBINE_FORMATS: LogFMT-10, FP8) and
    recv_scale_layouts (formats.RECV_SCALE_LAYOUTS, each for the dispatch dtypes that have it)."""
    sf = load_spec_file(write(tmp_path, """
models:
  - {name: m, hidden: 2880, num_experts: 64, num_topk: 4, ep_sizes: [2],
     modes: {low_latency: {dispatch_dtypes: [bf16, fp8, nvfp4],
                           combine_dtypes: [logfmt10, fp8_e4m3_f32_128],
                           recv_scale_layouts: [deepep, deepgemm, cutlass_128x4]}}}
"""))
    lc = lambda **kw: LowLatencyCombineSpec(hidden=2880, num_topk=4, num_experts=64,  # noqa: E731
                                            num_ranks=2, **kw)
    ld = lambda **kw: LowLatencyDispatchSpec(hidden=2880, num_topk=4, num_experts=64,  # noqa: E731
                                             num_ranks=2, **kw)
    for spec in (lc(), lc(wire_format="logfmt10"), lc(wire_format="fp8_e4m3_f32_128"),
                 ld(use_fp8=False), ld(), ld(recv_scale_layout="deepgemm"),
                 ld(use_fp8=False, wire_format="nvfp4"),
                 ld(use_fp8=False, wire_format="nvfp4", recv_scale_layout="cutlass_128x4")):
        assert spec in sf.specs, spec.name
    dispatches = [s for s in sf.specs if isinstance(s, LowLatencyDispatchSpec)]
    assert len(dispatches) == 5       # no deepgemm nvfp4, no cutlass fp8, bf16 has no scales


@pytest.mark.parametrize("text, needle", [
    ("models: [{name: x, hidden: 7168, num_experts: 256, num_topk: 8, ep_sizes: [2], "
     "modes: {low_latency: {combine_dtypes: [mxfp8]}}}]",
     "models[0].modes.low_latency.combine_dtypes: 'mxfp8' is not one of ['bf16', "),
    ("models: [{name: x, hidden: 7168, num_experts: 256, num_topk: 8, ep_sizes: [2], "
     "modes: {low_latency: {combine_dtypes: logfmt10}}}]",
     "models[0].modes.low_latency.combine_dtypes: expected a non-empty list of"),
    ("models: [{name: x, hidden: 7168, num_experts: 256, num_topk: 8, ep_sizes: [2], "
     "modes: {low_latency: {recv_scale_layouts: [tiled]}}}]",
     "models[0].modes.low_latency.recv_scale_layouts: 'tiled' is not one of ['deepep', "),
    ("models: [{name: x, hidden: 7168, num_experts: 256, num_topk: 8, ep_sizes: [2], "
     "modes: {low_latency: {dispatch_dtypes: [fp8], recv_scale_layouts: [cutlass_128x4]}}}]",
     "recv_scale_layouts: 'cutlass_128x4' is a layout of ('mxfp8', 'nvfp4'), none of the "
     "dispatch_dtypes ['fp8']"),
    ("models: [{name: x, hidden: 7168, num_experts: 256, num_topk: 8, ep_sizes: [2], "
     "modes: {low_latency: {dispatch_dtypes: [mxfp4]}}}]",
     "models[0].modes.low_latency.dispatch_dtypes: 'mxfp4' is not one of ['fp8', 'bf16'"),
    ("models: [{name: x, hidden: 7168, num_experts: 256, num_topk: 8, ep_sizes: [2], "
     "modes: {low_latency: {dispatch_dtypes: [opaque64+8]}}}]",
     "models[0] (ep_size 2): wire_format='opaque64+8': low-latency dispatch moves opaque rows and "
     "side rows of multiples of 16 bytes"),
    ("models: [{name: x, hidden: 7168, num_experts: 256, num_topk: 8, ep_sizes: [2], "
     "modes: {low_latency: {dispatch_dtypes: [opaque14336+16]}}}]",
     "wire_format='opaque14336+16': rows plus side rows must be at most 2 * hidden = 14336"),
    ("models: [{name: x, hidden: 2896, num_experts: 256, num_topk: 8, ep_sizes: [2], "
     "modes: {low_latency: {dispatch_dtypes: [nvfp4]}}}]", "hidden=2896: must be a multiple of 32"),
    ("models: [{name: x, hidden: 7168, num_experts: 256, num_topk: 8, ep_sizes: [2], "
     "modes: {normal: {dtypes: [fp4]}}}]", "'opaque<row>[+<side>]'"),
    ("models: [{name: x, hidden: 7168, num_experts: 256, num_topk: 8, ep_sizes: [2], "
     "modes: {normal: {dtypes: [bf16]}}, colour: red}]", "models[0]: unknown key(s) ['colour']"),
    ("models: [{name: x, hidden: '7168', num_experts: 256, num_topk: 8, ep_sizes: [2], "
     "modes: {normal: {}}}]", "models[0].hidden: expected an int"),
    ("models: [{name: x, hidden: 7168, num_experts: 256, num_topk: 8, ep_sizes: [2], "
     "modes: {normal: {dtypes: [fp16]}}}]", "models[0].modes.normal.dtypes"),
    ("models: [{name: x, hidden: 7170, num_experts: 256, num_topk: 8, ep_sizes: [2], "
     "modes: {normal: {}}}]", "hidden=7170"),
    ("kernels: [{family: warp_drive}]", "kernels[0].family"),
    ("arch: sm_90\nmodels: [\n  {name: x,\n  hidden: : 3}\n", "line "),
    ("just a string", "top level"),
])
def test_bad_spec_files_name_file_key_and_expectation(tmp_path, text, needle):
    path = write(tmp_path, text)
    with pytest.raises(SpecFileError) as e:
        load_spec_file(path)
    assert path in str(e.value) and needle in str(e.value), str(e.value)


def test_precompile_then_cache_commands(tmp_path, capsys):
    jit._memo.clear()
    cache_dir = str(tmp_path / "cache")
    spec = write(tmp_path, SMALL)
    assert main(["--cache-dir", cache_dir, "precompile", "--spec", spec, "--jobs", "1"]) == 0
    err = capsys.readouterr().err
    assert "2 compiled, 0 cached, 0 failed" in err
    jit._memo.clear()
    assert main(["--cache-dir", cache_dir, "precompile", "--spec", spec, "--jobs", "2"]) == 0
    assert "0 compiled, 2 cached, 0 failed" in capsys.readouterr().err

    assert main(["--cache-dir", cache_dir, "cache", "ls"]) == 0
    out = capsys.readouterr().out
    assert "2 entries" in out and "layout_k4_e64_r2" in out
    key = [line.split()[0] for line in out.splitlines() if "layout_k4_e64_r2" in line][0]
    assert main(["--cache-dir", cache_dir, "cache", "inspect", key]) == 0
    out = capsys.readouterr().out
    assert '"cubin_sha256"' in out and '"registers"' in out
    assert main(["--cache-dir", cache_dir, "cache", "inspect", "nope"]) == 1

    archive = str(tmp_path / "c.tar.gz")
    assert main(["--cache-dir", cache_dir, "cache", "export", archive]) == 0
    assert main(["--cache-dir", cache_dir, "cache", "clear"]) == 0
    assert "removed 2 entries" in capsys.readouterr().out
    assert main(["--cache-dir", cache_dir, "cache", "import", archive]) == 0
    assert "imported 2 entries" in capsys.readouterr().out
    assert main(["--cache-dir", cache_dir, "cache", "gc"]) == 0
    assert "removed 0 items" in capsys.readouterr().out


def test_precompile_reports_bad_spec_file_and_exit_code(tmp_path, capsys):
    path = write(tmp_path, "kernels: [{family: layout, num_ranks: 3, num_experts: 64, num_topk: 4}]")
    assert main(["--cache-dir", str(tmp_path), "precompile", "--spec", path, "--arch", "sm_90"]) == 2
    assert "num_experts" in capsys.readouterr().err
    assert main(["--cache-dir", str(tmp_path), "precompile", "--spec", str(tmp_path / "missing.yaml"),
                 "--arch", "sm_90"]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert main(["--cache-dir", str(tmp_path), "precompile", "--spec", write(tmp_path, SMALL),
                 "--arch", "hopper"]) == 2
    assert "--arch='hopper'" in capsys.readouterr().err


def test_cli_entry_points_and_doctor(tmp_path):
    env = dict(os.environ, EPGEN_CACHE_DIR=str(tmp_path), PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-m", "epgen", "doctor"], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=120)
    assert "NVRTC" in r.stdout and "NVSHMEM" in r.stdout and "cache" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-m", "epgen", "--help"], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=60)
    assert r.returncode == 0 and "precompile" in r.stdout
