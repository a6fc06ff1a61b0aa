"""The `epgen` command never shows a traceback: a failed compile shows the compiler's message
and where its whole log is; broken pipes, missing folders, missing logs, bad EPGEN_* values and
truncated archives are one clear line each; options go where a user puts them."""
import os
import subprocess

import pytest

from epgen import jit
from epgen.jit import codegen
from epgen.cache import Cache
from epgen.precompile import precompile
from epgen.jit.specs import LayoutSpec, LowLatencyCombineSpec, LowLatencyDispatchSpec, NormalCombineSpec
from sandbox import env, epgen_argv, run

SPEC = LayoutSpec(num_ranks=2, num_experts=32, num_topk=4)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cli-errors") / "cache")
    jit._memo.clear()
    jit.build(SPEC, "sm_90", Cache(root))
    return root


def test_failed_precompile_shows_the_compiler_message_and_keeps_the_log(tmp_path, monkeypatch,
                                                                        capsys):
    # Fake: every spec the validation accepts compiles, so a compile failure is reached by
    # appending a line that is not C++ to the real rendered source.
    real = codegen.render
    monkeypatch.setattr(codegen, "render", lambda s: real(s) + "\nthis is not C++;\n")
    jit._memo.clear()
    spec = LayoutSpec(num_ranks=2, num_experts=32, num_topk=2)
    outcomes = precompile([spec], "sm_90", str(tmp_path), 1)
    err = capsys.readouterr().err
    assert outcomes[0].status == "failed"
    assert "NVRTC failed for LayoutSpec(" in err
    assert "error" in err.split("NVRTC failed for", 1)[1], err        # the compiler's words
    log_line = [ln for ln in err.splitlines() if "whole log: " in ln]
    assert log_line, err
    path = log_line[0].split("whole log: ", 1)[1].strip()
    assert os.path.dirname(path) == os.path.join(str(tmp_path), ".failed")
    text = open(path).read()
    assert "this is not C++" in text and outcomes[0].log_path == path
    assert f"failed: {spec.name}" in err


def test_broken_pipe_is_quiet(cache_dir):
    r, w = os.pipe()
    os.close(r)                                   # the reader is gone before epgen writes
    p = subprocess.run(epgen_argv("--cache-dir", cache_dir, "cache", "ls"), stdout=w,
                       stderr=subprocess.PIPE, text=True, env=env(), timeout=120)
    os.close(w)
    assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr
    assert p.returncode == 141


def test_export_to_a_missing_folder(cache_dir, tmp_path):
    target = str(tmp_path / "no" / "such" / "dir" / "c.tar")
    r = run(epgen_argv("--cache-dir", cache_dir, "cache", "export", target))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert target in r.stderr and "create the missing folder" in r.stderr, r.stderr


def test_inspect_log_without_a_log(tmp_path):
    root = str(tmp_path / "c")
    jit._memo.clear()
    entry = jit.build(SPEC, "sm_90", Cache(root))
    os.unlink(os.path.join(entry.path, "build.log"))
    r = run(epgen_argv("--cache-dir", root, "cache", "inspect", entry.key[:8], "--log"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "has no build log" in r.stderr, r.stderr


@pytest.mark.parametrize("var, value, rule", [
    ("EPGEN_COMPILE_LOCK_TIMEOUT_S", "abc", "positive number of seconds"),
    ("EPGEN_COMPILE_LOCK_TIMEOUT_S", "-5", "positive number of seconds"),
    ("EPGEN_TIMEOUT_S", "nan", "positive number of seconds"),
    ("EPGEN_JIT", "maybe", "must be one of"),
    ("EPGEN_PCH", "2", "must be one of"),
    ("EPGEN_ARCH", "sm_70", "builds and tests for sm_90"),
    ("EPGEN_RANKS_PER_NODE", "abc", "must be a positive integer"),
    ("EPGEN_LAUNCH_MPS", "maybe", "must be one of"),
])
def test_bad_epgen_variables_are_named(tmp_path, var, value, rule):
    spec = tmp_path / "s.yaml"
    spec.write_text("kernels: [{family: layout, num_ranks: 2, num_experts: 32, num_topk: 4}]\n")
    r = run(epgen_argv("--cache-dir", str(tmp_path / "c"), "precompile", "--spec", str(spec),
                       "--arch", "sm_90"), env=env(**{var: value}))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert var in r.stderr and repr(value) in r.stderr and rule in r.stderr, r.stderr
    r = run(epgen_argv("--cache-dir", str(tmp_path / "c"), "doctor"), env=env(**{var: value}))
    assert r.returncode == 1 and "[MISSING] environment" in r.stdout and var in r.stdout


def test_truncated_archive(cache_dir, tmp_path):
    archive = str(tmp_path / "c.tar.gz")
    assert run(epgen_argv("--cache-dir", cache_dir, "cache", "export", archive)).returncode == 0
    data = open(archive, "rb").read()
    cut = str(tmp_path / "cut.tar.gz")
    with open(cut, "wb") as f:
        f.write(data[: len(data) * 2 // 3])
    r = run(epgen_argv("--cache-dir", str(tmp_path / "dst"), "cache", "import", cut))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "truncated or not a tar" in r.stderr, r.stderr


def test_cache_dir_after_the_subcommand_and_version(cache_dir):
    r = run(epgen_argv("cache", "ls", "--cache-dir", cache_dir))
    assert r.returncode == 0 and f"{cache_dir}: 1 entries" in r.stdout, r.stdout + r.stderr
    r = run(epgen_argv("--version"))
    assert r.returncode == 0 and r.stdout.startswith("epgen "), r.stdout


def test_corrupt_rows_say_why(tmp_path):
    root = str(tmp_path / "c")
    jit._memo.clear()
    entry = jit.build(SPEC, "sm_90", Cache(root))
    cubin = os.path.join(entry.path, "kernel.cubin")
    data = bytearray(open(cubin, "rb").read())
    data[100] ^= 0xFF
    open(cubin, "wb").write(bytes(data))
    r = run(epgen_argv("--cache-dir", root, "cache", "ls"))
    assert r.returncode == 0 and "CORRUPT" in r.stdout and "checksum mismatch" in r.stdout, r.stdout


def test_kernel_names_tell_the_families_apart():
    ll = LowLatencyDispatchSpec(hidden=7168, num_topk=8, num_experts=256, num_ranks=2,
                                use_fp8=False)
    normal = __import__("epgen.jit.specs", fromlist=["x"]).normal_dispatch_spec(7168, 8, 256, 2, "bf16")
    assert ll.name.startswith("ll_dispatch_") and normal.name.startswith("dispatch_")
    assert LowLatencyCombineSpec(hidden=7168, num_topk=8, num_experts=256,
                                 num_ranks=2).name.startswith("ll_combine_")
    assert NormalCombineSpec(hidden=7168, num_topk=8, num_ranks=2).name.startswith("combine_")


def test_a_cache_dir_that_is_a_file_and_an_empty_key(tmp_path, cache_dir):
    a_file = tmp_path / "f"
    a_file.write_text("mine")
    for args in (["cache", "ls"], ["cache", "clear"], ["cache", "gc"]):
        r = run(epgen_argv("--cache-dir", str(a_file), *args))
        assert r.returncode == 1 and "is a file, not a cache folder" in r.stderr, (args, r.stderr)
    assert a_file.read_text() == "mine"
    r = run(epgen_argv("--cache-dir", cache_dir, "cache", "inspect", ""))
    assert r.returncode == 2 and "give a key" in r.stderr, r.stdout + r.stderr
