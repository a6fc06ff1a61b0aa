"""The `epgen` command: precompile, cache (ls | inspect | clear | gc | export | import), alias,
bench, doctor."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import time


def _cache(args):
    from .cache import Cache
    return Cache(args.cache_dir)


def cmd_precompile(args) -> int:
    from . import toolchain
    from .precompile import SpecFileError, load_spec_file, precompile
    try:
        spec_file = load_spec_file(args.spec)
        arch = toolchain.resolve_arch(args.arch, spec_file.arch)
        toolchain.discover()
    except (SpecFileError, ValueError, toolchain.ToolchainError) as e:
        print(f"epgen precompile: error: {e}", file=sys.stderr)
        return 2
    print(f"epgen precompile: {len(spec_file.specs)} kernels from {args.spec} for {arch}",
          file=sys.stderr)
    outcomes = precompile(spec_file.specs, arch, _cache(args).root, args.jobs)
    return 1 if any(o.status == "failed" for o in outcomes) else 0


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def cmd_cache_ls(args) -> int:
    from .cache.store import CorruptEntry, read_entry
    cache = _cache(args)
    rows = []
    for path in cache.entries():
        try:
            m = read_entry(path).manifest
            rows.append((m["key"][:12], m["name"], m["key_parts"].get("arch", "?"),
                         _human(m["cubin_bytes"]),
                         f"{m.get('nvrtc_seconds', 0) + m.get('link_seconds', 0):.2f}s",
                         time.strftime("%Y-%m-%d %H:%M", time.localtime(m.get("created", 0)))))
        except CorruptEntry as e:
            rows.append(("CORRUPT", os.path.basename(path), "", "", "", str(e)[:40]))
    print(f"{cache.root}: {len(rows)} entries")
    if rows:
        header = ("KEY", "KERNEL", "ARCH", "CUBIN", "COMPILE", "CREATED")
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        for r in [header, *rows]:
            print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def cmd_cache_inspect(args) -> int:
    from .cache.store import LOG, CorruptEntry, read_entry
    cache = _cache(args)
    matches = cache.find(args.key)
    if not matches:
        print(f"epgen cache inspect: no entry matches {args.key!r} in {cache.root}", file=sys.stderr)
        return 1
    if len(matches) > 1:
        print(f"epgen cache inspect: {args.key!r} is ambiguous: "
              f"{[os.path.basename(m) for m in matches]}", file=sys.stderr)
        return 1
    try:
        entry = read_entry(matches[0])
    except CorruptEntry as e:
        print(f"epgen cache inspect: {e}", file=sys.stderr)
        return 1
    print(f"entry: {entry.path}")
    print(json.dumps(entry.manifest, indent=2, sort_keys=True))
    if args.log:
        with open(os.path.join(entry.path, LOG), encoding="utf-8", errors="replace") as f:
            print(f.read())
    return 0


def cmd_cache_clear(args) -> int:
    n = _cache(args).clear()
    print(f"removed {n} entries from {_cache(args).root}")
    return 0


def cmd_cache_gc(args) -> int:
    from . import toolchain
    try:
        signature = toolchain.discover().signature()
    except toolchain.ToolchainError as e:
        print(f"epgen cache gc: toolchain not found ({e}); keeping entries of every toolchain",
              file=sys.stderr)
        signature = None
    removed = _cache(args).gc(signature, args.older_than_days)
    for r in removed:
        print(f"removed {r}")
    print(f"gc: removed {len(removed)} items")
    return 0


def cmd_cache_export(args) -> int:
    from .cache.transfer import export_cache
    n = export_cache(_cache(args), args.file)
    print(f"exported {n} entries to {args.file}")
    return 0


def cmd_cache_import(args) -> int:
    from .cache.transfer import import_cache
    try:
        n, rejected = import_cache(_cache(args), args.file)
    except (OSError, ValueError, tarfile.TarError) as e:
        print(f"epgen cache import: {args.file}: {e}", file=sys.stderr)
        return 1
    for r in rejected:
        print(f"rejected: {r}", file=sys.stderr)
    print(f"imported {n} entries into {_cache(args).root}" +
          (f", rejected {len(rejected)}" if rejected else ""))
    return 1 if rejected else 0


def cmd_alias(args) -> int:
    from . import alias
    try:
        if args.alias_command == "install":
            print(f"epgen alias: wrote {alias.install()}: `import deep_ep` now gives epgen")
        else:
            path = alias.remove()
            print(f"epgen alias: removed {path}" if path else
                  f"epgen alias: no alias in {alias.site_dir()}")
    except alias.AliasError as e:
        print(f"epgen alias {args.alias_command}: error: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_bench(args) -> int:
    from .bench.cli import run
    return run(args)


def _gpu_count() -> int:
    from cuda.bindings import driver
    err, n = driver.cuDeviceGetCount()
    return n if err == driver.CUresult.CUDA_SUCCESS else 0


def cmd_doctor(args) -> int:
    from . import toolchain
    from .cache import Cache
    problems = 0

    def line(ok, what, detail, fix=""):
        nonlocal problems
        problems += 0 if ok else 1
        print(f"[{'ok' if ok else 'MISSING'}] {what}: {detail}" + (f"\n      fix: {fix}" if fix else ""))

    try:
        tc = toolchain.discover()
        line(True, "NVRTC", "%d.%d" % tc.nvrtc_version)
        line(True, "nvJitLink", "%d.%d" % tc.nvjitlink_version)
        line(True, "CUDA runtime headers", f"{tc.cuda_runtime_include} (CUDART {tc.cudart_header_version})")
        line(True, "CCCL headers", f"{tc.cccl_include} (CCCL {tc.cccl_version})")
        line(True, "NVSHMEM", "%d.%d.%d at %s" % (*tc.nvshmem_version, os.path.dirname(tc.nvshmem_include)))
        line(os.path.isfile(tc.host_library), "NVSHMEM host library", tc.host_library,
             "" if os.path.isfile(tc.host_library) else toolchain.INSTALL_HINT)
        for note in tc.notes:
            line(False, "toolchain", note, "install matching NVRTC and nvJitLink versions")
    except toolchain.ToolchainError as e:
        line(False, "toolchain", str(e), toolchain.INSTALL_HINT)
    arch = toolchain.gpu_arch()
    if arch:
        from cuda.bindings import driver
        _, n = driver.cuDeviceGetCount()
        names = []
        for i in range(n):
            _, name = driver.cuDeviceGetName(256, i)
            names.append(name.split(b"\0")[0].decode())
        line(True, "GPUs", f"{n} x {', '.join(sorted(set(names)))} ({arch})")
    else:
        line(True, "GPUs", "none visible: compiling works with --arch sm_90 / EPGEN_ARCH; "
             "running needs a GPU")
    from .runtime import sharing
    ok, text = sharing.doctor_report(_gpu_count() if arch else 0)
    line(ok, "ranks per GPU", text)
    cache = Cache(args.cache_dir)
    n = len(cache.entries())
    writable = os.access(cache.root if os.path.isdir(cache.root) else
                         os.path.dirname(cache.root) or ".", os.W_OK)
    line(writable, "cache", f"{cache.root}: {n} entries", "" if writable else
         "set EPGEN_CACHE_DIR to a writable directory")
    from . import alias
    line(True, "deep_ep", alias.describe())
    for var in ("EPGEN_CACHE_DIR", "EPGEN_ARCH", "EPGEN_JIT", "EPGEN_TIMEOUT_S", "EPGEN_LOG",
                "NVSHMEM_SYMMETRIC_SIZE"):
        if os.environ.get(var):
            print(f"[env] {var}={os.environ[var]}")
    print("doctor: all found" if problems == 0 else f"doctor: {problems} problem(s)")
    return 0 if problems == 0 else 1


def build_parser() -> argparse.ArgumentParser:
    from .precompile import default_jobs
    p = argparse.ArgumentParser(prog="epgen", description="epgen: generated MoE EP kernels")
    p.add_argument("--cache-dir", default=None,
                   help="cache directory (default: $EPGEN_CACHE_DIR or ~/.cache/epgen)")
    sub = p.add_subparsers(dest="command", required=True)
    pc = sub.add_parser("precompile", help="compile every kernel a spec file's runs need")
    pc.add_argument("--spec", required=True, help="YAML spec file (see examples/deepseek-v3.yaml)")
    pc.add_argument("--arch", default=None, help="target, e.g. sm_90 (default: EPGEN_ARCH, the "
                    "file's arch, else the GPU present)")
    pc.add_argument("--jobs", type=int, default=default_jobs(), help="parallel compiles")
    pc.set_defaults(fn=cmd_precompile)
    cache = sub.add_parser("cache", help="inspect, clear and move the kernel cache")
    csub = cache.add_subparsers(dest="cache_command", required=True)
    csub.add_parser("ls", help="list entries").set_defaults(fn=cmd_cache_ls)
    ins = csub.add_parser("inspect", help="show one entry's manifest")
    ins.add_argument("key", help="key (or a prefix), entry directory name, or kernel name")
    ins.add_argument("--log", action="store_true", help="also print the build log")
    ins.set_defaults(fn=cmd_cache_inspect)
    csub.add_parser("clear", help="remove every entry").set_defaults(fn=cmd_cache_clear)
    gc = csub.add_parser("gc", help="remove corrupt entries, other toolchains' entries, leftovers")
    gc.add_argument("--older-than-days", type=float, default=None)
    gc.set_defaults(fn=cmd_cache_gc)
    ex = csub.add_parser("export", help="write the cache to a .tar or .tar.gz file")
    ex.add_argument("file")
    ex.set_defaults(fn=cmd_cache_export)
    im = csub.add_parser("import", help="add a .tar(.gz) export, verifying checksums")
    im.add_argument("file")
    im.set_defaults(fn=cmd_cache_import)
    al = sub.add_parser("alias", help="map `import deep_ep` to epgen in this environment")
    asub = al.add_subparsers(dest="alias_command", required=True)
    asub.add_parser("install", help="write a deep_ep alias package into site-packages (refused "
                    "while a real DeepEP is installed)").set_defaults(fn=cmd_alias)
    asub.add_parser("remove", help="delete the alias (only one epgen wrote)").set_defaults(
        fn=cmd_alias)
    from .bench.cli import add_arguments as bench_arguments
    bench = sub.add_parser("bench", help="normal and low-latency benchmarks on N ranks: "
                           "progress, JSON, PNG plot, table")
    bench_arguments(bench)
    bench.set_defaults(fn=cmd_bench)
    sub.add_parser("doctor", help="what toolchain, NVSHMEM, GPUs and cache are found").set_defaults(
        fn=cmd_doctor)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    raise SystemExit(main())
