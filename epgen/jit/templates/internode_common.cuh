// What the internode normal mode's data kernels share (internode_dispatch.cuh,
// internode_combine.cuh): the control words' indices in the regions' fixed control areas
// (regions/internode.py has the byte layout) and small helpers.
#pragma once
#include "common.cuh"
#include "nvshmem_prelude.cuh"

namespace epgen {

namespace idisp {
// Channels the control areas have room for (epgen::facts, layout_facts.py): fixed, so the
// counters keep their offsets whatever a call's channel count.
constexpr int kMaxC = facts::kInodeMaxChannels;
// RDMA control area (at args.rdma_ctrl_off), uint64 [Nn][kMaxC] each:
constexpr int kRdmaTail = 0;              // receiver: records source node m put into ring (m, c)
constexpr int kRdmaHead = 1;              // sender: records node n's forwarder consumed (credit)
constexpr int kRdmaSendTail = 2;          // sender, local: records put to node n
constexpr int kRdmaRecvHead = 3;          // receiver, local: records consumed of ring (m, c)
// NVLink control area (at args.nvl_ctrl_off), uint64 [kMaxC][L][Nn] each, then an int:
constexpr int kFwdTail = 0;               // forwarder, local: records pushed to local rank l
constexpr int kFwdHead = 1;               // forwarder: records local rank l consumed (written by l)
constexpr int kNvlTail = 2;               // receiver: records forwarder j pushed (written by j)
constexpr int kNvlHead = 3;               // receiver, local: records consumed from forwarder j
// Wait details in the error word (which wait missed its deadline).
constexpr int kWaitRdmaCredit = 11, kWaitRdmaData = 12, kWaitNvlSpace = 13, kWaitNvlData = 14;

// A ring this rank's own warps fill (a forwarder feeding its own receiver or reducer, a sender
// its own forwarder) stalls only behind the warp feeding it, which waits on the real peer under
// the same deadline and reports that peer. A wait on such a ring outlasts the deadline by
// kSelfFedGraceNs so that the feeder reports first; only if none did is `upstream` named (the
// node peer feeding the chain, or -1: none known), never the rank itself. Other rings: plain
// wait_until naming `peer`.
constexpr unsigned long long kSelfFedGraceNs = 100ull * 1000 * 1000;

template <typename Pred>
__device__ __forceinline__ bool wait_ring(const ErrorCtx& e, int peer, int me, int upstream,
                                          int detail, Pred pred) {
    if (peer != me) return wait_until(e, peer, detail, pred);
    if (wait_until(e, upstream, detail, pred, /*report_timeout=*/false)) return true;
    const unsigned long long until = globaltimer() + kSelfFedGraceNs;
    while (!error_raised(e)) {
        if (pred()) return true;
        if (globaltimer() > until) {
            report_error(e, kErrTimeout, upstream, detail);
            return false;
        }
    }
    return false;
}
__device__ __forceinline__ void st_volatile_ll(long long* p, long long v) {
    asm volatile("st.volatile.global.s64 [%0], %1;" :: "l"(p), "l"(v) : "memory");
}
// A ring's reader, by a whole warp: how many records past `pos` (at most `want`) the writer has
// published at *tailp; lane 0 waits (wait_ring: `peer`, `me`, `upstream`, `detail`), every lane
// gets the count, -1 when the wait failed. The __syncwarp orders lane 0's acquire before every
// lane's reads.
__device__ __forceinline__ long long warp_wait_records(const ErrorCtx& err, int peer, int me,
                                                       int upstream, int detail,
                                                       const long long* tailp, long long pos,
                                                       long long want) {
    long long avail = 0;
    if ((threadIdx.x & 31) == 0) {
        long long t = pos;
        if (wait_ring(err, peer, me, upstream, detail,
                      [&] { t = ld_acquire_sys(tailp); return t - pos > 0; }))
            avail = min(t - pos, want);
        else
            avail = -1;
    }
    avail = __shfl_sync(0xffffffffu, avail, 0);
    __syncwarp();
    return avail;
}
}  // namespace idisp

}  // namespace epgen
