"""CPU, socket level: the interface NVSHMEM's bootstrap listens on (epgen/runtime/netif.py,
nvshmem.apply_environment): loopback on one host, the interface that routes to MASTER_ADDR
across hosts, and never over a value the user set."""
from __future__ import annotations

import ipaddress
import os
import socket

import pytest

from epgen.runtime import netif, nvshmem

IFNAME = nvshmem.BOOTSTRAP_IFNAME


def _own_non_loopback_ipv4() -> tuple[str, str] | None:
    """(interface, address) of this host's first non-loopback IPv4 address, if any."""
    for _, name in socket.if_nameindex():
        addr = netif._ipv4_of(name)
        if addr and not ipaddress.ip_address(addr).is_loopback:
            return name, addr
    return None


@pytest.fixture
def env(monkeypatch):
    """apply_environment writes os.environ: give it a copy the test throws away."""
    fresh = {k: v for k, v in os.environ.items() if not k.startswith("NVSHMEM_")}
    fresh.pop("MASTER_ADDR", None)
    monkeypatch.setattr(os, "environ", fresh)
    return fresh


def test_loopback_address_routes_through_the_loopback_interface():
    name, family = netif.interface_to("127.0.0.1")
    assert family == socket.AF_INET and netif._ipv4_of(name) == "127.0.0.1"
    assert netif.is_loopback("127.0.0.1") and netif.is_loopback("localhost")


def test_own_address_routes_through_its_interface():
    own = _own_non_loopback_ipv4()
    if own is None:
        pytest.skip("this host has no non-loopback IPv4 address")
    name, addr = own
    assert netif.interface_to(addr) == (name, socket.AF_INET)
    assert not netif.is_loopback(addr)


def test_single_host_bootstraps_on_loopback(env):
    env["MASTER_ADDR"] = "10.1.2.3"          # ignored: one host needs no route
    nvshmem.apply_environment(0, multi_node=False)
    assert netif._ipv4_of(env[IFNAME]) == "127.0.0.1"
    assert env["NVSHMEM_REMOTE_TRANSPORT"] == "none"


def test_hosts_bootstrap_on_the_interface_to_master_addr(env):
    own = _own_non_loopback_ipv4()
    if own is None:
        pytest.skip("this host has no non-loopback IPv4 address")
    env["MASTER_ADDR"] = own[1]
    nvshmem.apply_environment(0, multi_node=True)
    assert env[IFNAME] == own[0]
    assert "NVSHMEM_REMOTE_TRANSPORT" not in env      # the IB transports stay available


def test_hosts_with_a_loopback_master_addr_use_loopback(env):
    env["MASTER_ADDR"] = "127.0.0.1"
    nvshmem.apply_environment(0, multi_node=True)
    assert netif._ipv4_of(env[IFNAME]) == "127.0.0.1"


def test_hosts_without_master_addr_leave_nvshmem_its_choice(env):
    nvshmem.apply_environment(0, multi_node=True)
    assert IFNAME not in env


def test_unroutable_master_addr_warns_and_leaves_nvshmem_its_choice(env):
    env["MASTER_ADDR"] = "no-such-host.invalid"
    with pytest.warns(RuntimeWarning, match="MASTER_ADDR='no-such-host.invalid'"):
        nvshmem.apply_environment(0, multi_node=True)
    assert IFNAME not in env


@pytest.mark.parametrize("multi_node", [False, True])
def test_a_value_the_user_set_is_kept(env, multi_node):
    env[IFNAME] = "ib0"
    env["MASTER_ADDR"] = "127.0.0.1"
    nvshmem.apply_environment(0, multi_node=multi_node)
    assert env[IFNAME] == "ib0"
