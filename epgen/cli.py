"""The `epgen` command: precompile, cache (ls | inspect | clear | gc | export | import), alias,
bench, doctor.

Every failure is one line naming what failed and the fix, never a traceback: main() turns an
OSError (path, reason), a bad EPGEN_* value and a broken pipe into exit codes.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time

from . import __version__


def _cache(args):
    from .cache import Cache
    cache = Cache(args.cache_dir)
    if os.path.exists(cache.root) and not os.path.isdir(cache.root):
        raise NotADirectoryError(errno.ENOTDIR, "is a file, not a cache folder", cache.root)
    return cache


def cmd_precompile(args) -> int:
    from . import env
    from .jit import toolchain
    from .precompile import precompile
    from .specfile import SpecFileError, load_spec_file
    try:
        check_env()
        spec_file = load_spec_file(args.spec)
        arch = toolchain.resolve_arch(args.arch, spec_file.arch)
        toolchain.discover()
    except (SpecFileError, env.EnvError, ValueError, toolchain.ToolchainError) as e:
        print(f"epgen precompile: error: {e}", file=sys.stderr)
        return 2
    if args.jobs < 1:
        print(f"epgen precompile: error: --jobs={args.jobs}: must be >= 1", file=sys.stderr)
        return 2
    print(f"epgen precompile: {len(spec_file.specs)} kernels from {args.spec} for {arch}",
          file=sys.stderr)
    outcomes = precompile(spec_file.specs, arch, _cache(args).root, args.jobs)
    if len(outcomes) < len(spec_file.specs):
        return 130                                   # interrupted (the summary says so)
    return 1 if any(o.status == "failed" for o in outcomes) else 0


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def _reason(e: Exception, path: str) -> str:
    """An entry error without its (already shown) path."""
    return str(e).replace(f"{path}: ", "", 1)


def cmd_cache_ls(args) -> int:
    from .cache.store import CorruptEntry, EntryUnreadable, read_entry
    cache = _cache(args)
    rows, problems = [], []
    for path in cache.entries():
        try:
            m = read_entry(path).manifest
            rows.append((m["key"][:12], m["name"], str(m["key_parts"].get("arch", "?")),
                         _human(m["cubin_bytes"]),
                         f"{m.get('nvrtc_seconds', 0) + m.get('link_seconds', 0):.2f}s",
                         time.strftime("%Y-%m-%d %H:%M", time.localtime(m.get("created", 0)))))
        except CorruptEntry as e:
            problems.append(f"CORRUPT {os.path.basename(path)}: {_reason(e, path)} "
                            "(`epgen cache gc` removes it; a build rebuilds it)")
        except EntryUnreadable as e:
            problems.append(f"UNREADABLE {os.path.basename(path)}: {_reason(e, path)}")
    print(f"{cache.root}: {len(rows)} entries" +
          (f", {len(problems)} not usable" if problems else ""))
    if rows:
        header = ("KEY", "KERNEL", "ARCH", "CUBIN", "COMPILE", "CREATED")
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        for r in [header, *rows]:
            print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    for p in problems:
        print(p)
    return 0


def cmd_cache_inspect(args) -> int:
    from .cache.store import LOG, CorruptEntry, EntryUnreadable, read_entry
    cache = _cache(args)
    if not args.key.strip():
        print("epgen cache inspect: KEY='': give a key (or a prefix), an entry folder name or a "
              "kernel name", file=sys.stderr)
        return 2
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
    except (CorruptEntry, EntryUnreadable) as e:
        print(f"epgen cache inspect: {e}", file=sys.stderr)
        return 1
    print(f"entry: {entry.path}")
    print(json.dumps(entry.manifest, indent=2, sort_keys=True))
    if args.log:
        log = os.path.join(entry.path, LOG)
        if not os.path.isfile(log):
            print(f"epgen cache inspect: {log}: this entry has no build log", file=sys.stderr)
            return 1
        with open(log, encoding="utf-8", errors="replace") as f:
            print(f.read())
    return 0


def _print_report(cmd: str, cache, report, what: str) -> int:
    for r in report.removed:
        print(f"removed {r}")
    for k in report.kept:
        print(f"kept {k} (not created by epgen)")
    for f in report.failed:
        print(f"epgen cache {cmd}: could not remove {f}", file=sys.stderr)
    print(f"{cmd}: removed {len(report.removed)} {what} from {cache.root}" +
          (f", {len(report.failed)} could not be removed" if report.failed else "") +
          (f", kept {len(report.kept)} unknown" if report.kept else ""))
    return 1 if report.failed else 0


def cmd_cache_clear(args) -> int:
    from .cache.store import NotACacheError
    cache = _cache(args)
    try:
        report = cache.clear()
    except NotACacheError as e:
        print(f"epgen cache clear: {e}", file=sys.stderr)
        return 1
    return _print_report("clear", cache, report, "entries")


def cmd_cache_gc(args) -> int:
    from .jit import toolchain
    try:
        signature = toolchain.discover().signature()
    except toolchain.ToolchainError as e:
        print(f"epgen cache gc: toolchain not found ({e}); keeping entries of every toolchain",
              file=sys.stderr)
        signature = None
    cache = _cache(args)
    return _print_report("gc", cache, cache.gc(signature, args.older_than_days), "items")


def cmd_cache_export(args) -> int:
    from .cache.transfer import export_cache
    n = export_cache(_cache(args), args.file)
    print(f"exported {n} entries to {args.file}")
    return 0


def cmd_cache_import(args) -> int:
    from .cache.transfer import ImportRefused, import_cache
    cache = _cache(args)
    try:
        n, rejected = import_cache(cache, args.file, verify=args.verify)
    except ImportRefused as e:
        print(f"epgen cache import: {e}", file=sys.stderr)
        return 1
    for r in rejected:
        print(f"rejected: {r}", file=sys.stderr)
    print(f"imported {n} entries into {cache.root}" +
          (f", rejected {len(rejected)}" if rejected else "") +
          (" (each recompiled and byte-identical)" if args.verify else ""))
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


KNOWN_ENV = ("EPGEN_CACHE_DIR", "EPGEN_ARCH", "EPGEN_JIT", "EPGEN_PCH", "EPGEN_FASTCALL",
             "EPGEN_TIMEOUT_S", "EPGEN_COMPILE_LOCK_TIMEOUT_S", "EPGEN_LL_COMBINE",
             "EPGEN_INTERNODE_WARPS_PER_BLOCK", "EPGEN_RANKS_PER_NODE", "EPGEN_LAUNCH_MPS",
             "NVSHMEM_SYMMETRIC_SIZE")


def check_env() -> None:
    """Read every EPGEN_* variable the way its user does; EnvError/ValueError names a bad one."""
    from . import env
    from .jit import toolchain
    env.flag("EPGEN_JIT", True)
    env.flag("EPGEN_PCH", False)
    env.flag("EPGEN_FASTCALL", True)
    env.positive_seconds("EPGEN_TIMEOUT_S", 100.0)
    env.positive_seconds("EPGEN_COMPILE_LOCK_TIMEOUT_S", 900.0)
    if os.environ.get("EPGEN_ARCH"):
        toolchain.resolve_arch()
    from . import variants
    variants.combine_variant()
    variants.internode_warps_per_block()
    from .runtime import topology
    topology.parse_ranks_per_node(os.environ.get(topology.RANKS_PER_NODE_ENV))
    from . import launch
    launch.mps_wanted()


def _cache_state(root: str) -> tuple[bool, str, str]:
    """(ok, detail, fix) of a cache path for doctor."""
    from .cache import Cache
    if os.path.exists(root) and not os.path.isdir(root):
        return False, f"{root} is a file, not a folder", \
            "point EPGEN_CACHE_DIR / --cache-dir at a folder (or remove the file)"
    if not os.path.isdir(root):
        parent = root
        while not os.path.isdir(parent):
            parent = os.path.dirname(parent)
        if os.access(parent, os.W_OK | os.X_OK):
            return True, f"{root}: does not exist yet (created at the first compile)", ""
        return False, f"{root}: does not exist and {parent} is not writable", \
            "set EPGEN_CACHE_DIR to a writable directory"
    cache = Cache(root)
    n = len(cache.entries())
    if os.access(root, os.W_OK | os.X_OK) and not _read_only_fs(root):
        return True, f"{root}: {n} entries, writable", ""
    if n:
        return True, f"{root}: {n} entries, read-only (a deploy cache: serves hits; a kernel " \
            "it lacks cannot be compiled here, set EPGEN_JIT=0 to make that an error up front)", ""
    return False, f"{root}: empty and read-only", "set EPGEN_CACHE_DIR to a writable directory"


def _read_only_fs(path: str) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def cmd_doctor(args) -> int:
    from . import env
    from .jit import toolchain
    from .cache import default_root
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
    ok, detail, fix = _cache_state(os.path.abspath(args.cache_dir or default_root()))
    line(ok, "cache", detail, fix)
    from . import alias
    line(True, "deep_ep", alias.describe())
    try:
        check_env()
    except (env.EnvError, ValueError) as e:
        line(False, "environment", str(e), "fix or unset the variable")
    for var in KNOWN_ENV:
        if os.environ.get(var):
            print(f"[env] {var}={os.environ[var]}")
    print("doctor: all found" if problems == 0 else f"doctor: {problems} problem(s)")
    return 0 if problems == 0 else 1


def build_parser() -> argparse.ArgumentParser:
    from .precompile import default_jobs
    p = argparse.ArgumentParser(prog="epgen", description="epgen: generated MoE EP kernels")
    p.add_argument("--version", action="version", version=f"epgen {__version__}")
    cache_help = "cache directory (default: $EPGEN_CACHE_DIR or ~/.cache/epgen)"
    p.add_argument("--cache-dir", default=None, help=cache_help)
    # Accepted after the subcommand as well: SUPPRESS keeps a value given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--cache-dir", default=argparse.SUPPRESS, help=cache_help)
    sub = p.add_subparsers(dest="command", required=True)
    pc = sub.add_parser("precompile", parents=[common],
                        help="compile every kernel a spec file's runs need")
    pc.add_argument("--spec", required=True, help="YAML spec file (see examples/deepseek-v3.yaml)")
    pc.add_argument("--arch", default=None, help="target, e.g. sm_90 (default: EPGEN_ARCH, the "
                    "file's arch, else the GPU present)")
    pc.add_argument("--jobs", type=int, default=default_jobs(), help="parallel compiles")
    pc.set_defaults(fn=cmd_precompile)
    cache = sub.add_parser("cache", parents=[common],
                           help="inspect, clear and move the kernel cache")
    csub = cache.add_subparsers(dest="cache_command", required=True)
    csub.add_parser("ls", parents=[common], help="list entries").set_defaults(fn=cmd_cache_ls)
    ins = csub.add_parser("inspect", parents=[common], help="show one entry's manifest")
    ins.add_argument("key", help="key (or a prefix), entry directory name, or kernel name")
    ins.add_argument("--log", action="store_true", help="also print the build log")
    ins.set_defaults(fn=cmd_cache_inspect)
    csub.add_parser("clear", parents=[common], help="remove every entry (only in a folder "
                    "epgen created as a cache)").set_defaults(fn=cmd_cache_clear)
    gc = csub.add_parser("gc", parents=[common], help="remove corrupt entries, other "
                         "toolchains' entries, epgen's leftovers; list what is not epgen's")
    gc.add_argument("--older-than-days", type=float, default=None)
    gc.set_defaults(fn=cmd_cache_gc)
    ex = csub.add_parser("export", parents=[common], help="write the cache to a .tar or .tar.gz file")
    ex.add_argument("file")
    ex.set_defaults(fn=cmd_cache_export)
    im = csub.add_parser("import", parents=[common], help="add a .tar(.gz) export, verifying "
                         "checksums (--verify: recompiling each entry)")
    im.add_argument("file")
    im.add_argument("--verify", action="store_true", help="recompile every entry from its "
                    "stored spec and refuse any whose cubin differs (needs the toolchain)")
    im.set_defaults(fn=cmd_cache_import)
    al = sub.add_parser("alias", help="map `import deep_ep` to epgen in this environment")
    asub = al.add_subparsers(dest="alias_command", required=True)
    asub.add_parser("install", help="write a deep_ep alias package into site-packages (refused "
                    "while a real DeepEP is installed)").set_defaults(fn=cmd_alias)
    asub.add_parser("remove", help="delete the alias (only one epgen wrote)").set_defaults(
        fn=cmd_alias)
    from .bench.cli import add_arguments as bench_arguments
    bench = sub.add_parser("bench", help="normal, low-latency, internode benchmarks on N ranks: "
                           "progress, JSON, PNG plot, table")
    bench_arguments(bench)
    bench.set_defaults(fn=cmd_bench)
    sub.add_parser("doctor", parents=[common], help="what toolchain, NVSHMEM, GPUs and cache "
                   "are found").set_defaults(fn=cmd_doctor)
    return p


def main(argv=None) -> int:
    from . import env
    from .cache.store import explain_os_error
    args = build_parser().parse_args(argv)
    name = " ".join(filter(None, (args.command, getattr(args, "cache_command", None))))
    try:
        rc = args.fn(args)
        sys.stdout.flush()          # a closed pipe shows here, not at exit
        return rc
    except BrokenPipeError:
        # `epgen cache ls | head`: the reader left; say nothing more (stdout is gone).
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), sys.stdout.fileno())
        return 141
    except env.EnvError as e:
        print(f"epgen: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"epgen {name}: error: {explain_os_error(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"epgen {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
