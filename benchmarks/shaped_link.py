"""Rate-limited links on one host, for the bandwidth-bound case of the push benchmarks.

Loopback moves a few GB/s on this box, so a push over it is bound by the CPU, not by the wire. Trainers and engines
on different hosts talk over NICs of 1-25 Gbit/s instead. This makes such a link for real: a network namespace per
link, joined to the host by a veth pair whose host end sends through a token-bucket filter (``tc qdisc ... tbf``)
at the given rate. The trainer stays in the host namespace and binds its rendezvous and gloo to the host end's
address; the receivers of that link enter the namespace (``enter``) before they connect, so every byte a trainer
sends them crosses the shaped veth (the kernel's own TCP stack, MTU 1500). Needs root and iproute2 (``ip``, ``tc``);
``available()`` says why not otherwise, and the benchmark then measures loopback only.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
from dataclasses import dataclass

CLONE_NEWNET = 0x40000000


@dataclass(frozen=True)
class Link:
    name: str  # "loopback" or "<rate>mbit"
    trainer_host: str  # the address the trainer binds (rendezvous + gloo)
    netns: str | None  # the namespace its receivers enter (None: the host's)
    rate_mbit: int | None

    @property
    def receiver_host(self) -> str:
        return self.trainer_host  # receivers connect to the trainer's address


LOOPBACK = Link("loopback", "127.0.0.1", None, None)


def available() -> str | None:
    """None when shaped links can be made here, else why not."""
    if os.geteuid() != 0:
        return "not root (network namespaces and tc need root)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"{tool} (iproute2) not found"
    return None


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)


def _teardown(i: int) -> None:
    for cmd in (["ip", "netns", "del", f"tsbench{i}"], ["ip", "link", "del", f"tsb{i}a"]):
        subprocess.run(cmd, capture_output=True, timeout=30)


@contextlib.contextmanager
def shaped_links(rates_mbit: list[int]):
    """Yield one Link per rate (namespace ``tsbench<i>``, veth ``tsb<i>a``/``tsb<i>b``, 10.77.<i>.1/.2), removed
    on exit."""
    links = []
    try:
        for i, rate in enumerate(rates_mbit):
            _teardown(i)  # left over from an interrupted run
            ns, a, b = f"tsbench{i}", f"tsb{i}a", f"tsb{i}b"
            host, peer = f"10.77.{i}.1", f"10.77.{i}.2"
            _run("ip", "netns", "add", ns)
            _run("ip", "link", "add", a, "type", "veth", "peer", "name", b)
            _run("ip", "link", "set", b, "netns", ns)
            _run("ip", "addr", "add", f"{host}/24", "dev", a)
            _run("ip", "link", "set", a, "up")
            _run("ip", "netns", "exec", ns, "ip", "addr", "add", f"{peer}/24", "dev", b)
            _run("ip", "netns", "exec", ns, "ip", "link", "set", b, "up")
            _run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
            # burst: 10 ms at the rate (at least 1 MB), so the bucket does not starve TCP at high rates
            burst = max(1 << 20, rate * 1_000_000 // 8 // 100)
            _run("tc", "qdisc", "add", "dev", a, "root", "tbf", "rate", f"{rate}mbit", "burst", str(burst),
                 "latency", "50ms")
            links.append(Link(f"{rate}mbit", host, ns, rate))
        yield links
    finally:
        for i in range(len(rates_mbit)):
            _teardown(i)


def enter(netns: str | None) -> None:
    """Move this process (its calling thread, before it opens any socket or starts threads that will) into
    ``netns``; sockets and threads created afterwards live there."""
    if netns is None:
        return
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    fd = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into network namespace {netns} failed")
    finally:
        os.close(fd)
