"""`epgen bench` (also `python -m epgen.bench`): normal, low-latency, internode benchmarks on N ranks.

    epgen bench --mode low_latency --ranks 2 --tokens 128 --hidden 7168 --topk 8 --experts 288 --out DIR
    epgen bench --mode normal --ranks 8 --sweep-tokens 512,1024,2048,4096 --out DIR
    epgen bench --mode internode --ranks 4 --ranks-per-node 2 --out DIR   (virtual nodes)
    epgen bench --mode internode --dry-run --ranks 64 --ranks-per-node 8  (byte counts, no GPU)
    epgen bench --replot DIR/low_latency.json --out DIR      (table and plot of a recorded run)

Ranks start through epgen.launch (one per GPU, else sharing GPUs under MPS: such records carry
shared_gpu and their plots say so). A progress bar goes to stderr; DIR gets <mode>.json and
<mode>.png; the table is printed last.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

MODES = ("normal", "low_latency", "internode")
ALL = ("normal", "low_latency")     # --mode all: the internode one needs nodes (--ranks-per-node)
# DeepEP's benchmark shapes: normal and internode 4096 tokens / 256 experts, low latency 128 / 288.
DEFAULTS = {"normal": dict(tokens=4096, experts=256), "low_latency": dict(tokens=128, experts=288),
            "internode": dict(tokens=4096, experts=256)}
# What the internode benchmark moves: BF16, and DeepEP's FP8 beside it (as its test tunes);
# --wire-format may only name the second.
INTERNODE_FORMATS = ("bf16", "fp8_e4m3_f32_128")


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
    g = p.add_argument_group("internode (--mode internode)")
    g.add_argument("--ranks-per-node", type=int, default=None,
                   help="ranks per node; on one host, virtual nodes (default: "
                        "EPGEN_RANKS_PER_NODE; required, as every rank runs on this host)")
    g.add_argument("--topk-groups", type=int, default=None,
                   help="nodes a token's experts may span (DeepEP's num_topk_groups; default "
                        "min(nodes, 4))")
    g.add_argument("--seed", type=int, default=0, help="routing seed (rank r: seed + r)")
    g.add_argument("--dry-run", action="store_true",
                   help="no GPU: print and write (DIR/internode_counts.json) the RDMA and "
                        "NVLink bytes the routing makes, as DeepEP counts them")


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
        if fmt.packing == "bytes":
            raise ValueError(f"--wire-format={fmt.name!r}: the benchmark sends BF16 tokens for "
                             "the kernels to cast; opaque rows are a caller's own bytes (not "
                             "benchmarked here)")
        formats.low_latency_fields(fmt)
        fmt.check_hidden(args.hidden, "--hidden")
    except ValueError as e:
        raise ValueError(str(e).replace("wire_format=", "--wire-format=")) from None
    if args.dry_run and args.mode != "internode":
        raise ValueError(f"--dry-run with --mode={args.mode}: only --mode internode has one")
    if args.combine_format not in formats.COMBINE_FORMATS:
        raise ValueError(f"--combine-format={args.combine_format!r}: must be one of "
                         f"{formats.COMBINE_FORMATS}")
    out = []
    for mode in (ALL if args.mode == "all" else (args.mode,)):
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
        cfg = dict(tokens=sorted(set(tokens)), hidden=args.hidden, topk=args.topk,
                   experts=E, runs=args.runs, warmup=args.warmup, wire_format=fmt.name)
        if mode == "low_latency":
            cfg["combine_format"] = args.combine_format
        if mode == "internode":
            cfg.update(_internode(args, fmt.name, E))
        out.append((mode, cfg))
    return out


def _internode(args, wire_format: str, experts: int) -> dict:
    """The internode mode's own fields, checked: nodes, routing, and (unless only counting)
    the kernels' limits, from the specs the run would build."""
    from ..runtime.topology import RANKS_PER_NODE_ENV, parse_ranks_per_node
    from . import internode_traffic
    L = args.ranks_per_node
    if L is None:
        L = parse_ranks_per_node(os.environ.get(RANKS_PER_NODE_ENV))
    if L is None:
        raise ValueError(f"--ranks-per-node: required for --mode internode (or "
                         f"{RANKS_PER_NODE_ENV}): every rank runs on this host, so the nodes "
                         "are virtual ones of that many ranks")
    if wire_format != INTERNODE_FORMATS[1]:
        raise ValueError(f"--wire-format={wire_format}: the internode benchmark moves "
                         f"{' and '.join(INTERNODE_FORMATS)} (DeepEP's), no other format")
    R = args.ranks
    if not isinstance(L, int) or L < 1 or R % L:
        raise ValueError(f"--ranks-per-node={L!r}: must be a positive int dividing --ranks={R}")
    G = args.topk_groups if args.topk_groups is not None else min(R // L, 4)
    internode_traffic.check_routing(experts, R, L, args.topk, G)
    if not args.dry_run:
        from .. import formats
        from ..jit import specs
        H = args.hidden
        scales = formats.get(wire_format).scale_cols(H)
        try:
            specs.internode_dispatch_spec(2 * H, 0, args.topk, R, L)
            specs.internode_dispatch_spec(H, scales, args.topk, R, L)
            specs.internode_combine_spec(H, 0, R, L)
        except specs.SpecError as e:
            raise ValueError(f"--ranks={R} --ranks-per-node={L}: the internode kernels "
                             f"refuse it ({e}); --dry-run counts bytes without them") from None
    return dict(ranks_per_node=L, topk_groups=G, seed=args.seed)


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
        if args.dry_run:
            return _dry_run(args, plans[0][1])
        from .. import launch
        placement = launch.plan(args.ranks)
    except ValueError as e:
        print(f"epgen bench: error: {e}", file=sys.stderr)
        return 2
    from . import internode, low_latency, normal, timing
    print(f"[placement] {placement.describe()}", file=sys.stderr)
    tables = []
    workers = {"normal": normal.worker, "low_latency": low_latency.worker,
               "internode": internode.worker}
    for mode, cfg in plans:
        worker = workers[mode]
        per_rank = launch.run_ranks(args.ranks, worker, cfg, timeout_s=560.0,
                                    placement=placement)
        run_fields = dict(card=timing.card(per_rank[0]["device"]), num_ranks=args.ranks,
                          hidden=cfg["hidden"], topk=cfg["topk"], num_experts=cfg["experts"],
                          commit=args.commit, versions=timing.versions(), **placement.record())
        if mode == "internode":
            run_fields.update(ranks_per_node=cfg["ranks_per_node"], topk_groups=cfg["topk_groups"],
                              num_nodes=args.ranks // cfg["ranks_per_node"])
        if mode == "low_latency":   # which combine kernel ran (hooked splits always per_expert)
            from ..variants import combine_variant
            run_fields["ll_combine"] = combine_variant()
        records = report.merge(per_rank, run_fields)
        path = os.path.join(args.out, f"{mode}.json")
        report.write_json(records, path)
        tables.append(f"wrote {path}\n" + _render(records, args.out, mode))
    print("\n\n".join(tables))
    return 0


def _dry_run(args, cfg) -> int:
    """The byte counts of the internode routing (no GPU): a line per token count and dtype,
    and DIR/internode_counts.json."""
    from . import internode_traffic, report
    R, L = args.ranks, cfg["ranks_per_node"]
    counts = []
    for T in cfg["tokens"]:
        idxs = internode_traffic.routing(R, L, T, cfg["experts"], cfg["topk"],
                                         cfg["topk_groups"], cfg["seed"])
        for dtype in INTERNODE_FORMATS:
            s = internode_traffic.summary(internode_traffic.count(
                idxs, cfg["experts"], L, cfg["hidden"], dtype))
            counts.append(dict(dtype=dtype, tokens=T, num_ranks=R, ranks_per_node=L,
                               num_nodes=R // L, hidden=cfg["hidden"], topk=cfg["topk"],
                               num_experts=cfg["experts"], topk_groups=cfg["topk_groups"],
                               seed=cfg["seed"], **s))
    path = os.path.join(args.out, "internode_counts.json")
    os.makedirs(args.out, exist_ok=True)
    with open(path, "w") as f:
        json.dump({"counts": counts}, f, indent=1)
    print(report.counts_table(counts) + f"\nwrote {path}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="epgen bench", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))
