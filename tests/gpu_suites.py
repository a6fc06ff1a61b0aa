"""Run the GPU suites one module at a time within a wall-clock budget (one device call).

    python tests/gpu_suites.py --tier quick --ranks 2 --budget 540 [--per-module 150] \
        [modules[:seconds]...] --out DIR

First `epgen precompile` of tests/data/gpu-suites.yaml (every kernel the suites use, compiled in
parallel), then each module (`faults`, `test_faults_gpu` or `tests/test_faults_gpu.py`; all
tests/test_*_gpu.py by default, in ORDER) as its own `pytest -m gpu -v -s -rA` process with
EPGEN_TEST_TIER / EPGEN_TEST_RANKS set and EPGEN_TEST_PRECOMPILE=0. A module gets
min(its limit, the budget left), its limit being --per-module or its own (`faults:240`); at it it gets SIGINT (pytest prints what finished,
run_ranks stops its MPS daemon), then SIGKILL for its whole process group (the rank workers die
with their parent anyway); an MPS daemon a killed module left behind is stopped. Once the budget
is spent the remaining modules are skipped. Everything goes to DIR/gpu_suites.log (appended),
the table to stdout last and to DIR/gpu_suites.json; kernels the modules compiled at first use
(not in the list) to DIR/compiled_at_first_use.yaml, as lines to add to it.

--pool: the modules in one pytest instead, with EPGEN_TEST_POOL=1 (tests/gpu_harness.py: runs
share their rank processes while the rank count stays, launch.RankPool), so the ranks' start
(MPS daemon, spawn, torch import, process group, NVSHMEM bootstrap, module loads) is paid once
per rank count, not once per module; its limit is the sum of the modules' limits; a row per
module from that run's summary. A failing run restarts the pool's processes, so one module's
failure costs a restart, not the rest of the run.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
SPEC = os.path.join(TESTS, "data", "gpu-suites.yaml")
# Default order: the base kernel suites first (a failure there explains later ones), the
# long fault-injection suites last.
ORDER = ["runtime", "normal", "low_latency", "ll_combine_rank", "conformance", "reliability",
         "serving_patterns", "moe_layer", "precompiled", "internode", "soak", "deadlines",
         "faults"]
MIN_LIMIT_S = 20.0          # a module is not started with less than this left
PYTEST_ARGS = ["-m", "gpu", "-v", "-s", "-rA", "-p", "no:cacheprovider"]


@dataclasses.dataclass
class Outcome:
    module: str
    rc: int | None = None          # None: not run (budget spent)
    seconds: float = 0.0
    passed: int = 0
    failed: int = 0                # failed + errors
    skipped: int = 0
    first_failure: str = ""
    timed_out: bool = False


def module_paths(names: list[str], tests_dir: str = TESTS) -> list[str]:
    """The module files for the names given (short, module or path form), or every
    test_*_gpu.py of tests_dir (ORDER first, the rest by name). Raises ValueError naming an
    unknown one and the known ones."""
    found = {os.path.basename(p)[len("test_"):-len("_gpu.py")]: p
             for p in sorted(glob.glob(os.path.join(tests_dir, "test_*_gpu.py")))}
    if not names:
        return [found[n] for n in ORDER if n in found] + \
            [p for n, p in found.items() if n not in ORDER]
    out = []
    for name in names:
        short = os.path.basename(name)
        short = short[:-3] if short.endswith(".py") else short
        short = short[len("test_"):] if short.startswith("test_") else short
        short = short[:-len("_gpu")] if short.endswith("_gpu") else short
        if short not in found:
            raise ValueError(f"module {name!r}: no tests/test_{short}_gpu.py; known: "
                             f"{', '.join(found)}")
        out.append(found[short])
    return out


def split_limits(names: list[str]) -> tuple[list[str], dict[str, float]]:
    """Module arguments with an optional own limit ("faults:240"): (names, {name: seconds}).
    Raises ValueError naming a bad one."""
    plain, limits = [], {}
    for arg in names:
        name, sep, secs = arg.partition(":")
        if sep:
            try:
                limits[name] = float(secs)
            except ValueError:
                raise ValueError(f"module {arg!r}: the limit after ':' must be seconds") from None
            if limits[name] <= 0:
                raise ValueError(f"module {arg!r}: the limit after ':' must be > 0")
        plain.append(name)
    return plain, limits


def next_limit(budget_left: float, per_module: float, floor: float | None = None) -> float | None:
    """The next module's time limit, or None when the budget left is below `floor`
    (MIN_LIMIT_S by default)."""
    if budget_left < (MIN_LIMIT_S if floor is None else floor):
        return None
    return min(per_module, budget_left)


_SUMMARY = re.compile(r"^=+ (.*) in [\d.]+s(?: \([\d:]+\))? =+$")
_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)")


def parse_pytest(text: str) -> dict:
    """passed / failed (errors included) / skipped counts from pytest's last summary line, and
    its first FAILED or ERROR line (-rA)."""
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    for line in text.splitlines():
        m = _SUMMARY.match(line.strip())
        if m:
            counts = {"passed": 0, "failed": 0, "skipped": 0}
            for n, kind in _COUNT.findall(m.group(1)):
                key = "failed" if kind.startswith("error") else kind
                if key in counts:
                    counts[key] += int(n)
    first = next((line.strip() for line in text.splitlines()
                  if line.startswith(("FAILED ", "ERROR "))), "")
    return {**counts, "first_failure": first}


_RESULT = re.compile(r"^(PASSED|FAILED|ERROR|SKIPPED)(?: \[\d+\])? (?:\S*/)?(test_\w+_gpu\.py)")
_DURATION = re.compile(r"^([\d.]+)s (?:setup|call|teardown)\s+(?:\S*/)?(test_\w+_gpu\.py)::")


def parse_pooled(text: str, names: list[str]) -> dict[str, dict]:
    """Per module (file name) of one pytest run over several modules (-rA, --durations=0):
    passed / failed / skipped, the first failure, seconds (its tests' setup + call +
    teardown)."""
    out = {n: {"passed": 0, "failed": 0, "skipped": 0, "first_failure": "", "seconds": 0.0}
           for n in names}
    for line in text.splitlines():
        line = line.strip()
        m = _RESULT.match(line)
        if m and m.group(2) in out:
            o = out[m.group(2)]
            kind = {"PASSED": "passed", "SKIPPED": "skipped"}.get(m.group(1), "failed")
            o[kind] += 1
            if kind == "failed" and not o["first_failure"]:
                o["first_failure"] = line
        m = _DURATION.match(line)
        if m and m.group(2) in out:
            out[m.group(2)]["seconds"] += float(m.group(1))
    return out


def compiled_during(cache_root: str, since: float, spec_file: str = SPEC) -> list[str]:
    """The kernels built into cache_root at or after `since` (epoch seconds) that spec_file does
    not list, as its entry lines: what the suites compiled at first use, to add to the list."""
    sys.path.insert(0, ROOT)
    from epgen import specfile
    from epgen.jit import specs

    def line(spec) -> str:
        return json.dumps(spec.to_json(), sort_keys=True)
    listed = {line(sp) for sp in specfile.load_spec_file(spec_file).specs}
    out = set()
    for path in glob.glob(os.path.join(cache_root, "*", "manifest.json")):
        try:
            with open(path) as f:
                m = json.load(f)
            if m.get("created", 0) >= since:
                out.add(line(specs.spec_from_json(m["spec"])))
        except (OSError, ValueError, KeyError, TypeError, specs.SpecError):
            continue              # an entry being written, or not a kernel of this epgen
    return sorted(out - listed)


def _stop_left_mps(tmp: str, log) -> None:
    """Stop any MPS daemon a killed run_ranks left in `tmp` (its TMPDIR)."""
    sys.path.insert(0, ROOT)
    from epgen.launch import MpsDaemon
    for root in glob.glob(os.path.join(tmp, MpsDaemon.PREFIX + "*")):
        log(f"[gpu_suites] stopping an MPS daemon left behind in {root}")
        MpsDaemon(root).stop()


def run_limited(cmd: list[str], env: dict, limit_s: float, log_file, grace_s: float,
                tmp: str | None = None) -> tuple[int, float, bool, str]:
    """cmd in its own session, its output appended to log_file as it comes; SIGINT at limit_s,
    SIGKILL to its process group grace_s later. Returns (rc, seconds, timed_out, output)."""
    log_file.flush()
    start = os.fstat(log_file.fileno()).st_size
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log_file.fileno(),
                            stderr=subprocess.STDOUT, start_new_session=True)
    timed_out = False
    try:
        proc.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        proc.send_signal(signal.SIGINT)       # pytest reports what finished; run_ranks cleans up
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)   # whatever of its group is left (rank workers)
    except (ProcessLookupError, PermissionError):
        pass
    rc = proc.wait()
    seconds = time.monotonic() - t0
    with open(log_file.name, errors="replace") as f:
        f.seek(start)
        text = f.read()
    if timed_out:
        log_file.write(f"\n[gpu_suites] killed at its limit of {limit_s:.0f} s\n")
    if tmp is not None:
        _stop_left_mps(tmp, lambda m: log_file.write(m + "\n"))
    log_file.flush()
    return rc, seconds, timed_out, text


def table(outcomes: list[Outcome]) -> str:
    rows = [("module", "rc", "s", "pass", "fail", "skip", "first failure")]
    for o in outcomes:
        if o.rc is None:
            rows.append((o.module, "-", "-", "-", "-", "-", "not run: budget spent"))
            continue
        why = o.first_failure or ("killed at its limit" if o.timed_out else "")
        if o.timed_out and o.first_failure:
            why = "killed at its limit; " + why
        rows.append((o.module, str(o.rc), f"{o.seconds:.0f}", str(o.passed), str(o.failed),
                     str(o.skipped), why[:160]))
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:6], widths)) + "  " + r[6]
                     for r in rows)


def collected_per_module(paths, env, names) -> dict[str, int]:
    """How many GPU tests pytest collects per module (file name) under env (its tier and rank
    counts parametrize them); {} when collection fails (every module then counts as cut)."""
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", *paths, "--collect-only", "-q",
                            "-m", "gpu", "-p", "no:cacheprovider"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return {}
    out = dict.fromkeys(names, 0)
    for line in r.stdout.splitlines():
        module = os.path.basename(line.split("::", 1)[0]) if "::" in line else None
        if module in out:
            out[module] += 1
    return out if r.returncode == 0 else {}


def run_pooled(paths, own, args, env, t_start, scratch, log, say) -> list[Outcome]:
    """--pool: every module in one pytest (EPGEN_TEST_POOL=1), limited to the sum of their
    limits and the budget left; an Outcome per module from its summary lines."""
    names = [os.path.basename(p) for p in paths]
    limit = next_limit(args.budget - (time.monotonic() - t_start) - args.grace,
                       sum(own.get(p, args.per_module) for p in paths))
    if limit is None:
        say("===== pooled modules: not run (budget spent)")
        return [Outcome(n) for n in names]
    say(f"===== {len(names)} modules in one pytest, rank processes shared (limit {limit:.0f} s)")
    tmp = os.path.join(scratch, "pooled")
    os.makedirs(tmp)
    rc, secs, killed, text = run_limited(
        [sys.executable, "-m", "pytest", *paths, *PYTEST_ARGS, "--durations=0"],
        {**env, "TMPDIR": tmp, "EPGEN_TEST_POOL": "1"}, limit, log, args.grace, tmp=tmp)
    per = parse_pooled(text, names)
    # killed: a module with results may still have tests the kill cut off (the pool runs
    # every module at 2 ranks, then at 4, ...): what it would have run, collected again
    expected = collected_per_module(paths, env, names) if killed else {}
    outcomes = []
    for n in names:
        o = per[n]
        ran = o["passed"] + o["failed"] + o["skipped"]
        cut = killed and (n not in expected or ran < expected[n])
        why = o["first_failure"] or ("" if ran else "no result: killed or not collected")
        if cut and ran:     # table() puts "killed at its limit" before it
            why = f"{ran} of {expected.get(n, '?')} tests reported" + (f"; {why}" if why else "")
        outcomes.append(Outcome(n, rc if o["failed"] or not ran or cut else 0, o["seconds"],
                                o["passed"], o["failed"], o["skipped"], why, timed_out=cut))
    say(f"[gpu_suites] pooled: rc={rc} {secs:.0f}s" + (" (killed)" if killed else ""))
    return outcomes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("modules", nargs="*",
                    help="modules to run, each optionally with its own limit (faults:240); "
                         "default: every GPU module")
    ap.add_argument("--tier", choices=("quick", "full"), default="quick")
    ap.add_argument("--ranks", default="2", help="EPGEN_TEST_RANKS, e.g. 2 or 2,8")
    ap.add_argument("--budget", type=float, required=True, help="seconds for everything")
    ap.add_argument("--per-module", type=float, default=150.0, help="seconds per module")
    ap.add_argument("--grace", type=float, default=30.0,
                    help="seconds between a module's SIGINT and its SIGKILL")
    ap.add_argument("--out", required=True, help="folder for gpu_suites.log and .json")
    ap.add_argument("--no-precompile", action="store_true")
    ap.add_argument("--pool", action="store_true",
                    help="the modules in one pytest whose runs share rank processes "
                         "(EPGEN_TEST_POOL=1: the ranks' start paid once per rank count); "
                         "its limit the sum of theirs")
    ap.add_argument("--tests-dir", default=TESTS, help=argparse.SUPPRESS)   # the CPU test's fakes
    args = ap.parse_args(argv)
    try:
        names, own_limits = split_limits(args.modules)
        paths = module_paths(names, args.tests_dir)
    except ValueError as exc:
        ap.error(str(exc))
    own = {p: own_limits[n] for n, p in zip(names, paths) if n in own_limits}
    if args.budget <= 0 or args.per_module <= 0:
        ap.error(f"--budget={args.budget:g} / --per-module={args.per_module:g}: must be > 0")
    os.makedirs(args.out, exist_ok=True)
    t_start, wall_start = time.monotonic(), time.time()
    scratch = tempfile.mkdtemp(prefix="epgen-suites-")
    env = {**os.environ, "EPGEN_TEST_TIER": args.tier, "EPGEN_TEST_RANKS": args.ranks,
           "EPGEN_TEST_PRECOMPILE": "0",
           "PYTHONPATH": os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    outcomes: list[Outcome] = []
    with open(os.path.join(args.out, "gpu_suites.log"), "a") as log:
        def say(msg):
            print(msg, flush=True)
            log.write(msg + "\n")
            log.flush()
        say(f"===== gpu_suites {time.strftime('%Y-%m-%d %H:%M:%S')} tier={args.tier} "
            f"ranks={args.ranks} budget={args.budget:g}s per-module={args.per_module:g}s")
        try:
            if not args.no_precompile:
                say(f"===== precompile {SPEC}")
                rc, secs, killed, _ = run_limited(
                    [sys.executable, "-m", "epgen", "precompile", "--spec", SPEC, "--jobs", "16"],
                    env, max(1.0, args.budget - args.grace - MIN_LIMIT_S), log, args.grace)
                say(f"[gpu_suites] precompile rc={rc} {secs:.0f}s"
                    + (" (killed: kernels compile at first use)" if killed else ""))
            if args.pool:
                outcomes += run_pooled(paths, own, args, env, t_start, scratch, log, say)
                paths = []
            for path in paths:
                name = os.path.basename(path)
                # the limit leaves the grace (SIGINT to SIGKILL) within the budget
                limit = next_limit(args.budget - (time.monotonic() - t_start) - args.grace,
                                   own.get(path, args.per_module))
                if limit is None:
                    outcomes.append(Outcome(name))
                    say(f"===== {name}: not run (budget spent)")
                    continue
                say(f"===== {name} (limit {limit:.0f} s)")
                tmp = os.path.join(scratch, name[:-3])
                os.makedirs(tmp)
                rc, secs, killed, text = run_limited(
                    [sys.executable, "-m", "pytest", path, *PYTEST_ARGS],
                    {**env, "TMPDIR": tmp}, limit, log, args.grace, tmp=tmp)
                o = Outcome(name, rc, secs, timed_out=killed, **parse_pytest(text))
                outcomes.append(o)
                say(f"[gpu_suites] {name}: rc={rc} {secs:.0f}s passed={o.passed} "
                    f"failed={o.failed} skipped={o.skipped}" + (" (killed)" if killed else ""))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            total = time.monotonic() - t_start
            text = table(outcomes)
            sys.path.insert(0, ROOT)
            from epgen.cache.store import default_root
            try:
                late = compiled_during(default_root(), wall_start - 1.0)
            except Exception as exc:  # noqa: BLE001 - a report, never the run's failure
                late, text = [], text + f"\n(cache not scanned: {exc})"
            if late:
                with open(os.path.join(args.out, "compiled_at_first_use.yaml"), "w") as f:
                    f.write("".join(f"  - {k}\n" for k in late))
                text += (f"\n{len(late)} kernels compiled at first use, not in {SPEC}: "
                         f"{args.out}/compiled_at_first_use.yaml lists them")
            say(f"===== summary ({total:.0f} s of {args.budget:g})\n{text}")
            with open(os.path.join(args.out, "gpu_suites.json"), "w") as f:
                json.dump({"tier": args.tier, "ranks": args.ranks, "budget_s": args.budget,
                           "seconds": round(total, 1),
                           "modules": [dataclasses.asdict(o) for o in outcomes]}, f, indent=1)
    bad = [o for o in outcomes if o.rc is None or o.rc != 0]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
