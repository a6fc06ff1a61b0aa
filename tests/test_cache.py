"""The cache: hit/miss, corrupt entries rebuilt (never loaded), relocation, one compile for
several processes, EPGEN_JIT=0, compile-during-capture, export/import with checksums."""
import multiprocessing
import os
import shutil

import pytest

from epgen import jit
from epgen.cache import Cache
from epgen.cache.transfer import export_cache, import_cache
from epgen.jit.specs import LayoutSpec

SPEC = LayoutSpec(num_ranks=2, num_experts=32, num_topk=4)


def fresh_build(cache, spec=SPEC):
    jit._memo.clear()           # the in-process table would otherwise answer first
    stats = {}
    entry = jit.build(spec, "sm_90", cache, stats)
    return entry, stats


def test_every_compile_option_is_in_the_key(monkeypatch):
    """An nvJitLink option (or an NVRTC one) that would change the cubin changes the key, so a
    cache never serves a cubin linked with other options; and the build uses the options
    hashed (the build log shows them)."""
    from epgen.jit import compiler
    _, key, _ = jit.describe_key(SPEC, "sm_90")
    monkeypatch.setattr(compiler, "LINK_OPTIONS", (*compiler.LINK_OPTIONS, "-ptxas-options=-O2"))
    _, link_key, parts = jit.describe_key(SPEC, "sm_90")
    assert link_key != key
    assert parts["recipe"]["nvjitlink_options"][-1] == "-ptxas-options=-O2"
    monkeypatch.setattr(compiler, "BASE_OPTIONS", (*compiler.BASE_OPTIONS, "-DEPGEN_UNUSED=1"))
    _, nvrtc_key, _ = jit.describe_key(SPEC, "sm_90")
    assert nvrtc_key not in (key, link_key)


def test_build_log_names_the_options_hashed(tmp_path):
    entry, _ = fresh_build(Cache(str(tmp_path)))
    recipe = entry.manifest["key_parts"]["recipe"]
    with open(os.path.join(entry.path, "build.log")) as f:
        log = f.read()
    assert f"# NVRTC {' '.join(recipe['nvrtc_options'])}\n" in log
    assert f"# nvJitLink {' '.join(recipe['nvjitlink_options'])}\n" in log


def test_miss_then_hit_and_entry_layout(tmp_path):
    cache = Cache(str(tmp_path))
    entry, stats = fresh_build(cache)
    assert stats["cached"] is False
    assert os.path.basename(entry.path) == f"{SPEC.name}.{entry.key}"
    assert sorted(os.listdir(entry.path)) == ["build.log", "kernel.cubin", "manifest.json", "source.cu"]
    m = entry.manifest
    assert m["spec"] == SPEC.to_json() and m["cubin_bytes"] == len(entry.cubin)
    for part in ("source_sha256", "headers_sha256", "nvshmem", "nvshmem_device_lib_sha256",
                 "nvrtc", "nvjitlink", "cudart_headers", "cccl", "arch", "recipe"):
        assert part in m["key_parts"], part
    recipe = m["key_parts"]["recipe"]
    options = recipe["nvrtc_options"] + recipe["nvjitlink_options"]
    assert "-lto" in recipe["nvjitlink_options"] and "-dlto" in recipe["nvrtc_options"]
    assert not any(o.startswith("-I") or "/" in o for o in options)
    again, stats = fresh_build(cache)
    assert stats["cached"] is True and again.cubin == entry.cubin


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest"])
def test_corrupt_entry_is_rebuilt_not_loaded(tmp_path, damage):
    cache = Cache(str(tmp_path))
    entry, _ = fresh_build(cache)
    good = entry.cubin
    cubin = os.path.join(entry.path, "kernel.cubin")
    if damage == "truncate":
        with open(cubin, "r+b") as f:
            f.truncate(len(good) // 2)
    elif damage == "flip":
        data = bytearray(good)
        data[len(data) // 2] ^= 0xFF
        with open(cubin, "wb") as f:
            f.write(data)
    else:
        with open(os.path.join(entry.path, "manifest.json"), "w") as f:
            f.write("{not json")
    rebuilt, stats = fresh_build(cache)
    assert stats["cached"] is False, "a damaged entry must be rebuilt"
    assert rebuilt.cubin == good
    assert os.listdir(os.path.join(str(tmp_path), ".trash")), "the damaged entry is moved aside"


def test_cache_is_relocatable(tmp_path):
    first = Cache(str(tmp_path / "a"))
    entry, _ = fresh_build(first)
    shutil.copytree(first.root, str(tmp_path / "b"))
    moved, stats = fresh_build(Cache(str(tmp_path / "b")))
    assert stats["cached"] is True and moved.key == entry.key and moved.cubin == entry.cubin


def _build_in_process(root, queue):
    stats = {}
    jit.build(LayoutSpec(num_ranks=4, num_experts=64, num_topk=6), "sm_90", Cache(root), stats)
    queue.put(stats["cached"])


def test_concurrent_processes_compile_once(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_build_in_process, args=(str(tmp_path), queue)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    cached = sorted(queue.get(timeout=5) for _ in procs)
    assert cached == [False, True, True, True], f"expected one compile, got {cached}"
    assert len(Cache(str(tmp_path)).entries()) == 1


def test_jit_disabled_names_the_spec(tmp_path, monkeypatch):
    monkeypatch.setenv("EPGEN_JIT", "0")
    with pytest.raises(jit.JitDisabledError) as e:
        fresh_build(Cache(str(tmp_path)))
    assert "LayoutSpec(num_ranks=2, num_experts=32, num_topk=4" in str(e.value)


def test_compile_during_capture_is_an_error(tmp_path, monkeypatch):
    # Fake: no GPU here to capture a graph, so the capture probe is replaced (the GPU suite
    # checks a real capture: tests/test_low_latency_gpu.py, _run_compile_in_capture).
    monkeypatch.setattr(jit, "_capturing", lambda: True)
    with pytest.raises(jit.CompileDuringCaptureError) as e:
        fresh_build(Cache(str(tmp_path)))
    assert "LayoutSpec(" in str(e.value) and "captured" in str(e.value)


def test_export_import_verifies_checksums(tmp_path):
    src = Cache(str(tmp_path / "src"))
    entry, _ = fresh_build(src)
    archive = str(tmp_path / "cache.tar.gz")
    assert export_cache(src, archive) == 1
    dst = Cache(str(tmp_path / "dst"))
    assert import_cache(dst, archive) == (1, [])
    moved, stats = fresh_build(dst)
    assert stats["cached"] is True and moved.cubin == entry.cubin
    # A tampered archive is rejected entry by entry.
    import tarfile
    bad_dir = tmp_path / "bad"
    with tarfile.open(archive) as tar:
        tar.extractall(bad_dir)
    cubin = bad_dir / os.path.basename(entry.path) / "kernel.cubin"
    cubin.write_bytes(cubin.read_bytes()[:-7] + b"garbage")
    bad_archive = str(tmp_path / "bad.tar")
    with tarfile.open(bad_archive, "w") as tar:
        tar.add(bad_dir / os.path.basename(entry.path), arcname=os.path.basename(entry.path))
    imported, rejected = import_cache(Cache(str(tmp_path / "dst2")), bad_archive)
    assert imported == 0 and len(rejected) == 1 and "checksum" in rejected[0]


def test_gc_removes_other_toolchains_and_leftovers(tmp_path):
    cache = Cache(str(tmp_path))
    entry, _ = fresh_build(cache)
    from epgen.jit import toolchain
    sig = toolchain.discover().signature()
    assert cache.gc(sig).removed == []
    other = dict(sig, nvrtc="99.9")
    os.makedirs(os.path.join(cache.root, ".tmp", "stale"), exist_ok=True)
    os.utime(os.path.join(cache.root, ".tmp", "stale"), (0, 0))
    removed = cache.gc(other).removed
    assert any("other toolchain" in r for r in removed) and any("stale" in r for r in removed)
    assert cache.entries() == []
