"""Which network interface of this host reaches an address (NVSHMEM's bootstrap socket).

NVSHMEM's unique-id bootstrap listens on one interface (NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME) and
every PE connects to PE 0 there; across hosts that must be an interface the others can reach,
and the interface that routes to MASTER_ADDR (where torch.distributed's rendezvous already
works) is one. Linux only (interface addresses from ioctl / /proc), as NVSHMEM is.
"""
from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct
from typing import Optional

_SIOCGIFADDR = 0x8915


def _ipv4_of(name: str) -> Optional[str]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            raw = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
        except OSError:
            return None
    return socket.inet_ntoa(raw[20:24])


def _ipv6_addresses() -> dict[str, str]:
    """address -> interface, from /proc/net/if_inet6 (no ioctl gives every IPv6 address)."""
    out = {}
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6:
                    addr = str(ipaddress.IPv6Address(bytes.fromhex(parts[0])))
                    out[addr] = parts[5]
    except OSError:
        pass
    return out


def interface_of_address(addr: str) -> Optional[str]:
    """The interface holding local address `addr`, or None."""
    ip = ipaddress.ip_address(addr)
    if ip.version == 6:
        return _ipv6_addresses().get(str(ip))
    for _, name in socket.if_nameindex():
        if _ipv4_of(name) == str(ip):
            return name
    return None


def source_address_to(host: str) -> tuple[str, int]:
    """(the local address the kernel's routing table would send from towards `host`, family).
    A UDP connect sends nothing; it only picks the route."""
    infos = socket.getaddrinfo(host, 9, type=socket.SOCK_DGRAM)
    if not infos:
        raise OSError(f"cannot resolve {host!r}")
    family, _, _, _, sockaddr = infos[0]
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect(sockaddr)
        return s.getsockname()[0], family


def interface_to(host: str) -> tuple[str, int]:
    """(interface, address family) whose address routes to `host` (a name or an address).
    Raises OSError when the host does not resolve or no interface holds the route's address."""
    local, family = source_address_to(host)
    name = interface_of_address(local.split("%")[0])
    if name is None:
        raise OSError(f"no interface holds {local}, the address that routes to {host!r}")
    return name, family


def is_loopback(host: str) -> bool:
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback
                   for info in socket.getaddrinfo(host, None))
    except (OSError, ValueError):
        return False
