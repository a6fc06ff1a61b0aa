"""Which ranks of a group form a node: the two levels of the internode normal mode.

A node is the set of ranks that reach each other over NVLink (in the internode mode: the ranks
a token is forwarded to after it crossed the network once). Ranks are placed as DeepEP places
them: node n holds the group ranks [n * L, (n + 1) * L) and rank r is local rank r % L of node
r // L, every node the same size L (any L, not only DeepEP's 8).

Where the nodes come from:
  * the host each rank runs on, gathered over the group: the host name and the kernel's boot id
    (containers of one machine share its boot id, so they count as one host; two machines that
    happen to share a host name do not);
  * `EPGEN_RANKS_PER_NODE=L` overrides it with virtual nodes of L ranks, each inside one host,
    so one host can be split into nodes whose traffic between nodes takes the RDMA path.
LOCAL_WORLD_SIZE is not used: it counts a host's ranks of WORLD, not of the group (a group of one
rank per host has nodes of one rank however many local ranks torchrun started).
"""
from __future__ import annotations

import dataclasses
import os
import socket
from typing import Optional, Sequence

RANKS_PER_NODE_ENV = "EPGEN_RANKS_PER_NODE"
_BOOT_ID = "/proc/sys/kernel/random/boot_id"


@dataclasses.dataclass(frozen=True)
class Topology:
    num_ranks: int
    ranks_per_node: int
    num_hosts: int            # physical hosts the group spans (virtual nodes share hosts)
    source: str               # where ranks_per_node came from: "hosts" or RANKS_PER_NODE_ENV

    @property
    def num_nodes(self) -> int:
        return self.num_ranks // self.ranks_per_node

    @property
    def spans_nodes(self) -> bool:
        return self.num_nodes > 1

    @property
    def spans_hosts(self) -> bool:
        return self.num_hosts > 1

    def node_of(self, rank: int) -> int:
        return rank // self.ranks_per_node

    def local_rank_of(self, rank: int) -> int:
        return rank % self.ranks_per_node

    def rank_of(self, node: int, local_rank: int) -> int:
        return node * self.ranks_per_node + local_rank


def host_key() -> str:
    """This process's host: host name and boot id."""
    try:
        with open(_BOOT_ID) as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def parse_ranks_per_node(raw: Optional[str]) -> Optional[int]:
    """EPGEN_RANKS_PER_NODE's value: None when unset or empty, else a positive int (ValueError
    naming it otherwise)."""
    if raw is None or raw.strip() == "":
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        raise ValueError(f"{RANKS_PER_NODE_ENV}={raw!r}: must be a positive integer") from None
    if value <= 0:
        raise ValueError(f"{RANKS_PER_NODE_ENV}={raw!r}: must be a positive integer")
    return value


def from_host_keys(keys: Sequence[str], ranks_per_node: Optional[str] = None) -> Topology:
    """The topology of a group whose rank r runs on host keys[r]; `ranks_per_node` is the raw
    EPGEN_RANKS_PER_NODE value (None or "" when unset).

    Hosts must hold contiguous, equal blocks of ranks (rank r on node r // L), as DeepEP needs;
    virtual nodes must divide the group and each lie inside one host."""
    n = len(keys)
    if n == 0:
        raise ValueError("a topology needs at least one rank")
    blocks: list[tuple[str, int]] = []          # (host, ranks) in rank order
    for k in keys:
        if blocks and blocks[-1][0] == k:
            blocks[-1] = (k, blocks[-1][1] + 1)
        else:
            blocks.append((k, 1))
    hosts = [h for h, _ in blocks]
    if len(set(hosts)) != len(hosts):
        raise ValueError(
            f"group ranks by host {_describe(keys)}: each host's ranks must be consecutive "
            "(rank r on node r // ranks_per_node, as torchrun numbers them)")
    sizes = {c for _, c in blocks}
    if len(sizes) != 1:
        raise ValueError(f"group ranks by host {_describe(keys)}: every host must hold the "
                         "same number of the group's ranks")
    host_size = sizes.pop()
    override = parse_ranks_per_node(ranks_per_node)
    if override is None:
        return Topology(n, host_size, len(blocks), "hosts")
    if n % override:
        raise ValueError(f"{RANKS_PER_NODE_ENV}={ranks_per_node!r}: must divide the group's "
                         f"{n} ranks")
    if host_size % override:
        raise ValueError(f"{RANKS_PER_NODE_ENV}={ranks_per_node!r}: must divide the ranks each "
                         f"host holds ({host_size}): a node cannot span hosts")
    return Topology(n, override, len(blocks), RANKS_PER_NODE_ENV)


def _describe(keys: Sequence[str]) -> str:
    names: dict[str, str] = {}
    for k in keys:
        names.setdefault(k, f"h{len(names)}")
    return "[" + ", ".join(names[k] for k in keys) + "] (" + \
        ", ".join(f"{v}={k}" for k, v in names.items()) + ")"


def resolve(group) -> Topology:
    """The topology of a torch.distributed group (collective: every rank of it calls this)."""
    import torch.distributed as dist
    mine = (host_key(), os.environ.get(RANKS_PER_NODE_ENV))
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, mine, group=group)
    return from_gathered(gathered)


def from_gathered(gathered: Sequence[tuple]) -> Topology:
    """from_host_keys over every rank's (host key, EPGEN_RANKS_PER_NODE); the ranks must agree
    on the override (each would otherwise lay out different nodes)."""
    values = [v for _, v in gathered]
    if len(set(values)) != 1:
        per_rank = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
        raise ValueError(f"{RANKS_PER_NODE_ENV} differs between the group's ranks ({per_rank}): "
                         "set it to the same value on every rank")
    return from_host_keys([k for k, _ in gathered], values[0])


def count_hosts(group) -> int:
    """How many hosts the group's ranks run on (collective; no layout rule applied)."""
    import torch.distributed as dist
    keys: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(keys, host_key(), group=group)
    return len(set(keys))
