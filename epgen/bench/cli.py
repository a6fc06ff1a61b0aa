"""`epgen bench` (also `python -m epgen.bench`): normal and low-latency benchmarks on N ranks.

    epgen bench --mode low_latency --ranks 2 --tokens 128 --hidden 7168 --topk 8 --experts 288 --out DIR
    epgen bench --mode normal --ranks 8 --sweep-tokens 512,1024,2048,4096 --out DIR
    epgen bench --replot DIR/low_latency.json --out DIR      (table and plot of a recorded run)

Ranks start through epgen.launch (one per GPU, else sharing GPUs under MPS: such records carry
shared_gpu and their plots say so). A progress bar goes to stderr; DIR gets <mode>.json and
<mode>.png; the table is printed last.
"""
from __future__ import annotations

import argparse
import os
import sys

MODES = ("normal", "low_latency")
# DeepEP's benchmark shapes: normal 4096 tokens / 256 experts, low latency 128 / 288.
DEFAULTS = {"normal": dict(tokens=4096, experts=256), "low_latency": dict(tokens=128, experts=288)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=MODES + ("all",), default="all")
    p.add_argument("--ranks", type=int, default=2, help="ranks (EP size); default 2")
    p.add_argument("--tokens", type=int, default=None,
                   help="tokens per rank (default: 4096 normal, 128 low latency)")
    p.add_argument("--sweep-tokens", default=None, metavar="T1,T2,...",
                   help="measure at each of these tokens per rank (cost against load); low "
                        "latency sizes its Buffer for the largest")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=None,
                   help="experts in all (default: 256 normal, 288 low latency)")
    p.add_argument("--wire-format", default="fp8_e4m3_f32_128",
                   help="the format dispatch moves beside BF16 (normal) or casts to (low "
                        "latency): fp8_e4m3_f32_128 (default, DeepEP's FP8), fp8_ue8m0_128, "
                        "mxfp8, nvfp4; records name it in `dtype`")
    p.add_argument("--combine-format", default="bf16",
                   help="what low-latency combine sends: bf16 (default), fp8_e4m3_f32_128, "
                        "logfmt10 (DeepEP's use_logfmt); records name it in `dtype`")
    p.add_argument("--runs", type=int, default=50, help="timed runs per measurement")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--commit", default="unknown", help="recorded with the results")
    p.add_argument("--out", default="bench/out", help="directory for <mode>.json and <mode>.png")
    p.add_argument("--replot", default=None, metavar="JSON",
                   help="no run: the table and plot of a recorded JSON file")


def _ints(text: str, name: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{name}={text!r}: must be comma-separated ints") from None
    if not vals:
        raise ValueError(f"{name}={text!r}: names no token count")
    return vals


def configs(args) -> list[tuple[str, dict]]:
    """(mode, worker config) per mode to run; ValueError naming the argument, the value and
    the rule, before anything starts."""
    from ..ops.low_latency import MAX_TOKENS
    from ..jit.specs import MAX_EXPERTS, MAX_TOPK
    if not isinstance(args.ranks, int) or args.ranks < 2:
        raise ValueError(f"--ranks={args.ranks!r}: must be an int >= 2 (expert parallelism)")
    for name in ("runs", "warmup"):
        v = getattr(args, name)
        if v < (1 if name == "runs" else 0):
            raise ValueError(f"--{name}={v}: must be >= {1 if name == 'runs' else 0}")
    if args.tokens is not None and args.sweep_tokens is not None:
        raise ValueError(f"--tokens={args.tokens} and --sweep-tokens={args.sweep_tokens}: "
                         "give one of them")
    if args.hidden <= 0 or args.hidden % 16:
        raise ValueError(f"--hidden={args.hidden}: must be a positive multiple of 16 (FP8 "
                         "dispatch and every low-latency kernel)")
    from .. import formats
    try:
        fmt = formats.get(args.wire_format, "--wire-format")
        formats.low_latency_fields(fmt)
        fmt.check_hidden(args.hidden, "--hidden")
    except ValueError as e:
        raise ValueError(str(e).replace("wire_format=", "--wire-format=")) from None
    if args.combine_format not in formats.COMBINE_FORMATS:
        raise ValueError(f"--combine-format={args.combine_format!r}: must be one of "
                         f"{formats.COMBINE_FORMATS}")
    out = []
    for mode in (MODES if args.mode == "all" else (args.mode,)):
        tokens = (_ints(args.sweep_tokens, "--sweep-tokens") if args.sweep_tokens
                  else [args.tokens or DEFAULTS[mode]["tokens"]])
        limit = MAX_TOKENS if mode == "low_latency" else 1 << 20
        for t in tokens:
            if not 1 <= t <= limit:
                raise ValueError(f"--tokens={t}: must be in [1, {limit}] for {mode}")
        E = args.experts or DEFAULTS[mode]["experts"]
        if E % args.ranks or not 0 < E <= MAX_EXPERTS:
            raise ValueError(f"--experts={E}: must be a positive multiple of --ranks="
                             f"{args.ranks}, <= {MAX_EXPERTS}")
        if not 1 <= args.topk <= min(MAX_TOPK, E):
            raise ValueError(f"--topk={args.topk}: must be in [1, min({MAX_TOPK}, experts={E})]")
        out.append((mode, dict(tokens=sorted(set(tokens)), hidden=args.hidden, topk=args.topk,
                               experts=E, runs=args.runs, warmup=args.warmup,
                               wire_format=fmt.name,
                               **({"combine_format": args.combine_format}
                                  if mode == "low_latency" else {}))))
    return out


def _render(records, out_dir, mode) -> str:
    from . import report
    png = os.path.join(out_dir, f"{mode}.png")
    try:
        report.plot(records, png, title=f"epgen bench: {mode.replace('_', '-')}")
        where = f"plot: {png}"
    except ImportError as e:        # matplotlib is the `bench` extra
        where = f"no plot ({e}; pip install 'epgen[bench]')"
    return report.table(records) + "\n" + where


def run(args) -> int:
    from . import report
    if args.replot:
        try:
            records = report.load(args.replot)
        except (OSError, ValueError) as e:
            print(f"epgen bench: error: {e}", file=sys.stderr)
            return 2
        mode = os.path.splitext(os.path.basename(args.replot))[0]
        print(_render(records, args.out, mode))
        return 0
    try:
        plans = configs(args)
        from .. import launch
        placement = launch.plan(args.ranks)
    except ValueError as e:
        print(f"epgen bench: error: {e}", file=sys.stderr)
        return 2
    from . import low_latency, normal, timing
    print(f"[placement] {placement.describe()}", file=sys.stderr)
    tables = []
    for mode, cfg in plans:
        worker = normal.worker if mode == "normal" else low_latency.worker
        per_rank = launch.run_ranks(args.ranks, worker, cfg, timeout_s=560.0,
                                    placement=placement)
        run_fields = dict(card=timing.card(per_rank[0]["device"]), num_ranks=args.ranks,
                          hidden=cfg["hidden"], topk=cfg["topk"], num_experts=cfg["experts"],
                          commit=args.commit, versions=timing.versions(), **placement.record())
        if mode != "normal":     # which combine kernel ran (hooked splits always per_expert)
            from ..variants import combine_variant
            run_fields["ll_combine"] = combine_variant()
        records = report.merge(per_rank, run_fields)
        path = os.path.join(args.out, f"{mode}.json")
        report.write_json(records, path)
        tables.append(f"wrote {path}\n" + _render(records, args.out, mode))
    print("\n\n".join(tables))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="epgen bench", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))
