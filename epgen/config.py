"""DeepEP's Config: SMs and chunking of normal-mode kernels (run-time values, not spec fields)."""
from __future__ import annotations

from dataclasses import dataclass

from .regions import internode as internode_regions
from .regions import intranode as intranode_regions


@dataclass
class Config:
    num_sms: int = 20
    num_max_nvl_chunked_send_tokens: int = 6
    num_max_nvl_chunked_recv_tokens: int = 256
    num_max_rdma_chunked_send_tokens: int = 6
    num_max_rdma_chunked_recv_tokens: int = 256

    def __post_init__(self):
        for name in ("num_sms", "num_max_nvl_chunked_send_tokens", "num_max_nvl_chunked_recv_tokens",
                     "num_max_rdma_chunked_send_tokens", "num_max_rdma_chunked_recv_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"Config.{name}={v!r}: must be a positive int")
        if self.num_sms % 2:
            raise ValueError(f"Config.num_sms={self.num_sms}: must be even (a channel is 2 SMs)")
        if self.num_max_nvl_chunked_send_tokens >= self.num_max_nvl_chunked_recv_tokens:
            raise ValueError(     # DeepEP's rule (csrc/config.hpp): strictly fewer
                f"Config.num_max_nvl_chunked_send_tokens={self.num_max_nvl_chunked_send_tokens}: "
                f"must be < num_max_nvl_chunked_recv_tokens={self.num_max_nvl_chunked_recv_tokens}")
        if self.num_max_rdma_chunked_send_tokens > self.rdma_ring_slots // 2:
            raise ValueError(     # DeepEP's rule: the receiver's lazy head update needs room
                f"Config.num_max_rdma_chunked_send_tokens={self.num_max_rdma_chunked_send_tokens}: "
                f"must be <= half of num_max_rdma_chunked_recv_tokens="
                f"{self.num_max_rdma_chunked_recv_tokens} rounded up to a multiple of it "
                f"({self.rdma_ring_slots})")

    @property
    def rdma_ring_slots(self) -> int:
        """Slots of an internode RDMA ring: num_max_rdma_chunked_recv_tokens rounded up to a
        multiple of num_max_rdma_chunked_send_tokens (a chunk's put never wraps; DeepEP rounds
        the same way, though epgen's field keeps the value given)."""
        send = self.num_max_rdma_chunked_send_tokens
        return -(-self.num_max_rdma_chunked_recv_tokens // send) * send

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        return intranode_regions.nvl_buffer_size_hint(self, hidden_bytes, num_ranks)

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """num_rdma_bytes for the internode normal mode (epgen/regions/internode.py); 0 when
        num_ranks fit one node (EPGEN_RANKS_PER_NODE, else LOCAL_WORLD_SIZE, else 8 ranks)."""
        return internode_regions.rdma_buffer_size_hint(self, hidden_bytes, num_ranks)
