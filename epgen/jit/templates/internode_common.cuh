// What the internode normal mode's data kernels share (internode_dispatch.cuh,
// internode_combine.cuh): the control words' indices in the regions' fixed control areas
// (ops/internode_layout.py has the byte layout) and small helpers.
#pragma once
#include "common.cuh"
#include "nvshmem_prelude.cuh"

namespace epgen {

namespace idisp {
constexpr int kMaxC = 64;                 // channels; fixed so counters keep their offsets
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

__device__ __forceinline__ void st_volatile_ll(long long* p, long long v) {
    asm volatile("st.volatile.global.s64 [%0], %1;" :: "l"(p), "l"(v) : "memory");
}
}  // namespace idisp

}  // namespace epgen
