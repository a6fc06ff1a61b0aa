"""Benchmark records -> JSON, the table printed last, and the PNG plot.

A record is one operation measured at one token count: op, dtype, num_sms, tokens, bytes,
time_us (median), gbps, samples, and optionally kernel_us (profiler) or host_inclusive_us
(CUDA events around the call), per_rank_median_us, plus where it ran (card, num_ranks, hidden,
topk, num_experts, commit, shared_gpu, ...). `nccl_a2a` records are NCCL moving the same bytes;
`copy` is the GPU-to-GPU copy bound. Records written by earlier bench scripts (one file per
rank list, no shared_gpu field) load too.
"""
from __future__ import annotations

import json
import os
import textwrap

COMMON = ("card", "device", "num_ranks", "hidden", "topk", "num_experts", "commit")


def merge(per_rank: list[dict], run: dict) -> list[dict]:
    """Rank 0's records, each with every rank's median and the run's fields."""
    out = []
    for i, rec in enumerate(per_rank[0]["records"]):
        meds = [r["records"][i]["time_us"] for r in per_rank]
        out.append(dict(rec, per_rank_median_us=meds, device=per_rank[0]["device"], **run))
    return out


def write_json(records: list[dict], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"records": records}, f, indent=1)


def load(path: str) -> list[dict]:
    """Records of a bench JSON file (rank 0's where the file lists every rank's)."""
    with open(path) as f:
        data = json.load(f)
    recs = data.get("records") if isinstance(data, dict) else None
    if not isinstance(recs, list) or not recs:
        raise ValueError(f"{path}: not a bench record file (needs a non-empty 'records' list)")
    if any("rank" in r for r in recs):
        recs = [r for r in recs if r.get("rank", 0) == 0]
    for r in recs:
        missing = [k for k in ("op", "dtype", "time_us", "gbps") if k not in r]
        if missing:
            raise ValueError(f"{path}: record {r.get('op', '?')} lacks {missing}")
        r.setdefault("shared_gpu", False)
        r.setdefault("num_sms", 0)
    return recs


def _label(r) -> str:
    with_sms = r.get("num_sms") and r["op"].startswith(("normal", "internode"))
    sms = f" {r['num_sms']} SMs" if with_sms else ""
    return f"{r['op']} {r['dtype']}{sms}"


# Whole operations: the ones whose bytes and work match NCCL's all-to-all and the copy (the
# hooked halves and back-to-back pairs do not).
WHOLE_OPS = ("normal_dispatch", "normal_combine", "ll_dispatch", "ll_combine")


def _is_epgen(r) -> bool:
    return r["op"] not in ("nccl_a2a", "copy")


def _nccl_for(records, r):
    return next((n for n in records if n["op"] == "nccl_a2a" and n["dtype"] == r["dtype"]
                 and n.get("tokens") == r.get("tokens")), None)


def _copy(records):
    return next((c for c in records if c["op"] == "copy"), None)


def _header(records) -> str:
    r = records[0]
    shared = any(x.get("shared_gpu") for x in records)
    where = (f"{r.get('card', '?')}, EP{r.get('num_ranks', '?')}"
             + (f" ({r.get('ranks_per_gpu', '?')} ranks per GPU)" if shared else ""))
    if r.get("num_nodes"):
        where += (f" = {r['num_nodes']} nodes x {r.get('ranks_per_node', '?')}"
                  f"{' (virtual, one host)' if r.get('virtual_nodes') else ''}, top-"
                  f"{r.get('topk_groups', '?')} nodes")
    return (f"{where}, hidden {r.get('hidden', '?')}, top-{r.get('topk', '?')} of "
            f"{r.get('num_experts', '?')} experts, commit {r.get('commit', '?')}"
            + ("; ranks share a GPU: kernel-overhead floor, not NVLink figures" if shared else "")
            + ("; virtual nodes: NVSHMEM's P2P transport carries the puts, the times are not "
               "RDMA times" if any(x.get("virtual_nodes") for x in records) else ""))


def _num(v, width: int, places: int) -> str:
    return f"{v:>{width}.{places}f}" if isinstance(v, (int, float)) else " " * (width - 1) + "-"


def table(records: list[dict]) -> str:
    """The summary printed last: per op and token count, time and GB/s against NCCL (time
    ratio, < 1 is faster) and the copy bound (bandwidth ratio)."""
    copy = _copy(records)
    w = max([30] + [len(_label(r)) + 1 for r in records])
    lines = [_header(records),
             "time: median us (low latency: kernel time, host-inclusive beside it; normal: "
             "CUDA events around the call, kernel time beside it)",
             f"{'op':<{w}}{'tokens':>7}{'time us':>10}{'GB/s':>9}{'kernel':>9}{'host':>9}"
             f"{'/NCCL':>7}{'/copy':>7}"]
    for r in records:
        if r["op"] == "copy":
            continue
        whole = r["op"] in WHOLE_OPS
        n = _nccl_for(records, r) if whole else None
        fmt = _num
        lines.append(f"{_label(r):<{w}}{r.get('tokens', 0):>7}{fmt(r['time_us'], 10, 1)}"
                     f"{fmt(r['gbps'], 9, 1)}{fmt(r.get('kernel_us'), 9, 1)}"
                     f"{fmt(r.get('host_inclusive_us'), 9, 1)}"
                     f"{fmt(r['time_us'] / n['time_us'] if n else None, 7, 2)}"
                     f"{fmt(r['gbps'] / copy['gbps'] if copy and whole else None, 7, 2)}")
    if copy:
        lines.append(f"copy bound (1 GiB GPU to GPU): {copy['gbps']:.1f} GB/s")
    inode = [r for r in records if "nvl_bytes" in r]
    if inode:
        lines += ["internode bytes of rank 0 as DeepEP counts them (RDMA: one row per token and "
                  "node, own node included; NVL: rows received), GB/s over the event time; "
                  "RDMA / per-rank: rows leaving the node against per-rank sending's"]
        lines += [f"{'op':<{w}}{'RDMA MB':>9}{'NVL MB':>9}{'RDMA GB/s':>11}{'NVL GB/s':>10}"
                  f"{'RDMA / per-rank':>17}"]
        lines += [f"{_label(r):<{w}}{r['rdma_bytes'] / 1e6:>9.1f}{r['nvl_bytes'] / 1e6:>9.1f}"
                  f"{_num(r['rdma_gbps'], 11, 1)}{_num(r['nvl_gbps'], 10, 1)}"
                  f"{_num(r.get('rdma_ratio'), 17, 3)}" for r in inode]
    return "\n".join(lines)


def counts_table(counts: list[dict]) -> str:
    """`epgen bench --mode internode --dry-run`: per token count and dtype, the bytes per rank
    (mean, max over ranks) of the routing, as internode_traffic.summary gives them."""
    lines = [f"{'layout':<22}{'dtype':<18}{'tokens':>7}{'B/token':>9}{'RDMA MB':>14}"
             f"{'NIC out MB':>14}{'NIC in MB':>14}{'per-rank MB':>14}{'NVL MB':>14}"
             f"{'ratio':>8}",
             "(MB per rank: mean over ranks [max]. RDMA: as DeepEP counts it, a row per token "
             "and node, own node included; NIC out / in: the rows to / from other nodes; "
             "per-rank: what sending a row per destination rank on another node would put on "
             "the NIC; NVL: rows received; ratio = NIC out / per-rank)"]
    for c in counts:
        layout = f"EP{c['num_ranks']} ({c['num_nodes']} nodes x {c['ranks_per_node']})"

        def mb(key):
            return f"{c[key]['mean'] / 1e6:.1f} [{c[key]['max'] / 1e6:.1f}]"
        lines.append(f"{layout:<22}{c['dtype']:<18}{c['tokens']:>7}{c['bytes_per_token']:>9}"
                     f"{mb('rdma_send_bytes'):>14}{mb('network_send_bytes'):>14}"
                     f"{mb('network_recv_bytes'):>14}{mb('per_rank_network_bytes'):>14}"
                     f"{mb('nvl_recv_bytes'):>14}{_num(c['rdma_ratio'], 8, 3)}")
    return "\n".join(lines)


SUPTITLE_CHARS = 150        # characters of the header a line of the 13-inch figure holds at 9 pt


def plot(records: list[dict], path: str, title: str = "") -> str:
    """Time and GB/s per operation (bars for one token count, lines against tokens for a
    sweep), NCCL and the copy bound drawn where measured; shared-GPU runs say so."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ours = [r for r in records if _is_epgen(r)]
    nccl = [r for r in records if r["op"] == "nccl_a2a"]
    copy = _copy(records)
    tokens = sorted({r.get("tokens", 0) for r in ours})
    fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(13, 5))
    if len(tokens) == 1:
        labels = [_label(r) for r in ours] + [f"NCCL a2a {r['dtype']}" for r in nccl]
        rows = ours + nccl
        colors = ["tab:blue"] * len(ours) + ["tab:gray"] * len(nccl)
        ax_t.barh(labels, [r["time_us"] for r in rows], color=colors)
        ax_t.set_xlabel("median time (us)")
        ax_t.invert_yaxis()
        ax_b.barh(labels, [r["gbps"] for r in rows], color=colors)
        ax_b.set_xlabel("GB/s")
        ax_b.invert_yaxis()
        if copy:
            ax_b.axvline(copy["gbps"], color="tab:red", linestyle="--",
                         label=f"copy bound {copy['gbps']:.0f} GB/s")
            ax_b.legend(loc="lower right")
        ax_b.set_yticklabels([])
    else:
        for lab in dict.fromkeys(_label(r) for r in ours):
            pts = sorted((r["tokens"], r) for r in ours if _label(r) == lab)
            ax_t.plot([t for t, _ in pts], [r["time_us"] for _, r in pts], marker="o", label=lab)
            ax_b.plot([t for t, _ in pts], [r["gbps"] for _, r in pts], marker="o", label=lab)
        for dtype in dict.fromkeys(r["dtype"] for r in nccl):
            pts = sorted((r["tokens"], r) for r in nccl if r["dtype"] == dtype)
            for ax, key in ((ax_t, "time_us"), (ax_b, "gbps")):
                ax.plot([t for t, _ in pts], [r[key] for _, r in pts], linestyle=":",
                        color="tab:gray", marker="x", label=f"NCCL a2a {dtype}")
        if copy:
            ax_b.axhline(copy["gbps"], color="tab:red", linestyle="--",
                         label=f"copy bound {copy['gbps']:.0f} GB/s")
        for ax, what in ((ax_t, "median time (us)"), (ax_b, "GB/s")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("tokens per rank")
            ax.set_ylabel(what)
            ax.grid(True, alpha=0.3)
        ax_t.legend(fontsize=7)
    shared = any(r.get("shared_gpu") for r in records)
    # The header is one long line (card, layout, caveats): wrapped to the figure's width, or
    # its ends fall outside the image.
    header = "\n".join(textwrap.wrap(_header(records), SUPTITLE_CHARS))
    fig.suptitle((title + "\n" if title else "") + header,
                 fontsize=9, color="tab:red" if shared else "black")
    if shared:
        fig.text(0.5, 0.5, "SHARED GPU", fontsize=48, color="tab:red", alpha=0.15,
                 ha="center", va="center", rotation=20)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
