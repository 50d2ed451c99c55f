"""A test host on a link of its own: a network namespace joined to this one by a veth pair.

The builder side of the remote tests and benchmarks lives in a network namespace with an address
from 198.18.0.0/15 (the range set aside for benchmark networks), reached through a veth pair
whose two ends carry one /30 between them and nothing else: no default route, no forwarding, so
nothing in the namespace reaches anything but this machine's end of the link, and nothing of this
machine's own traffic is routed through it. A shaped link is `tc tbf` on the egress of both ends
(netem, for delay or loss, is not available here).

Names carry this process's id (`imagepipe-t<pid>-<n>`, veth `ipt<pid>h<n>`/`ipt<pid>b<n>`), so two
runs of the suite never meet. Cleanup on every exit path: `close()` (the fixtures call it), and a
watchdog process in a session of its own that removes the namespace and the veth pair when its
stdin reaches end of file - when we close it, or when this process dies, even by SIGKILL.

Making a namespace and a veth pair in the host's namespace needs root (CAP_NET_ADMIN there):
`unavailable()` says why not, and the callers use loopback instead and say so.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

RANGE = ipaddress.ip_network("198.18.0.0/15")
PREFIX = "imagepipe-t"
_counter = itertools.count()

# tc tbf per rate: (rate, burst). The burst must hold at least one timer tick's worth of the
# rate, or tbf falls short of it (at 1 Gbit/s a tick of 4 ms is 500 KB).
RATES = {"100mbit": ("100mbit", "128kb"), "1gbit": ("1gbit", "1mb")}


def unavailable() -> str | None:
    """Why a namespace cannot be made here (None: it can)."""
    if os.geteuid() != 0:
        return "a network namespace and a veth pair in this machine's namespace need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"{tool} not found: install it with `sudo apt-get install iproute2` (setup.sh does)"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {res.stderr.strip()}")
    return res


def _taken() -> list[ipaddress.IPv4Interface]:
    out = _ip("-o", "-4", "addr", "show").stdout
    return [ipaddress.ip_interface(line.split()[3]) for line in out.splitlines() if " inet " in line]


def _subnet(seed: int) -> ipaddress.IPv4Network:
    """A /30 of the benchmark range that no address here is in yet (tried from `seed` on)."""
    subnets = RANGE.num_addresses // 4
    taken = _taken()
    for i in range(subnets):
        net = ipaddress.ip_network((int(RANGE.network_address) + ((seed + i) % subnets) * 4, 30))
        if not any(t.ip in net or net.overlaps(t.network) for t in taken):
            return net
    raise RuntimeError("no free /30 left in 198.18.0.0/15")


@dataclass
class Netns:
    """One namespace and its veth pair; `create()` makes them, `close()` removes them."""

    n: int = field(default_factory=lambda: next(_counter))
    rate: str | None = None                       # None: unshaped; else a key of RATES
    name: str = ""
    host_if: str = ""
    peer_if: str = ""
    host_ip: str = ""
    peer_ip: str = ""
    _watchdog: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        pid = os.getpid()
        self.name = f"{PREFIX}{pid}-{self.n}"
        self.host_if, self.peer_if = f"ipt{pid}h{self.n}", f"ipt{pid}b{self.n}"

    def create(self) -> Netns:
        why = unavailable()
        if why:
            raise RuntimeError(why)
        net = _subnet(os.getpid() * 8 + self.n)
        self.host_ip, self.peer_ip = str(net.network_address + 1), str(net.network_address + 2)
        # the watchdog first: from here on, whatever exists is removed however we end
        self._watchdog = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--reap", self.name, self.host_if],
            stdin=subprocess.PIPE, start_new_session=True)
        try:
            _ip("netns", "add", self.name)
            _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.peer_if)
            _ip("link", "set", self.peer_if, "netns", self.name)
            _ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
            _ip("link", "set", self.host_if, "up")
            inside = ("netns", "exec", self.name, "ip")
            _ip(*inside, "addr", "add", f"{self.peer_ip}/30", "dev", self.peer_if)
            _ip(*inside, "link", "set", self.peer_if, "up")
            _ip(*inside, "link", "set", "lo", "up")  # the builder's own loopback (packer, QEMU forwards)
            self.shape(self.rate)
        except BaseException:
            self.close()
            raise
        return self

    def exec_argv(self, argv: list[str]) -> list[str]:
        """argv run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def shape(self, rate: str | None) -> None:
        """Shape both directions of the link to `rate` (a key of RATES), or unshape it (None)."""
        if rate is not None and rate not in RATES:
            raise ValueError(f"rate {rate!r}: one of {', '.join(RATES)} or None")
        for prefix, dev in (([], self.host_if), (self.exec_argv([]), self.peer_if)):
            if rate is None:
                subprocess.run([*prefix, "tc", "qdisc", "del", "dev", dev, "root"], capture_output=True, timeout=30)
                continue
            speed, burst = RATES[rate]
            res = subprocess.run([*prefix, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", speed,
                                  "burst", burst, "latency", "50ms"], capture_output=True, text=True, timeout=30)
            if res.returncode != 0:
                raise RuntimeError(f"tc tbf on {dev}: {res.stderr.strip()}")
        self.rate = rate

    def bytes_to_host(self) -> int:
        """Bytes the builder side has sent to this machine so far (this end's receive counter)."""
        with open(f"/sys/class/net/{self.host_if}/statistics/rx_bytes") as f:
            return int(f.read())

    def bytes_to_builder(self) -> int:
        with open(f"/sys/class/net/{self.host_if}/statistics/tx_bytes") as f:
            return int(f.read())

    def close(self) -> None:
        """Stop everything running in the namespace, remove it and the veth pair."""
        reap(self.name, self.host_if)
        if self._watchdog is not None:
            if self._watchdog.stdin is not None:
                self._watchdog.stdin.close()  # EOF: it finds nothing left and exits
            try:
                self._watchdog.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._watchdog.kill()
            self._watchdog = None

    def __enter__(self) -> Netns:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.close()


def reap(name: str, host_if: str) -> None:
    """Kill what runs in namespace `name`, delete it, and the veth end `host_if` if still there."""
    if os.path.exists(f"/run/netns/{name}"):
        for _ in range(50):
            pids = [int(p) for p in _ip("netns", "pids", name, check=False).stdout.split()]
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
            time.sleep(0.1)
        _ip("netns", "del", name, check=False)
    if os.path.exists(f"/sys/class/net/{host_if}"):
        _ip("link", "del", host_if, check=False)


def _watch(name: str, host_if: str) -> None:
    """The watchdog: wait for end of file on stdin (our creator closed it or died), then reap."""
    try:
        while sys.stdin.buffer.read(4096):
            pass
    finally:
        reap(name, host_if)


if __name__ == "__main__" and sys.argv[1:2] == ["--reap"]:
    _watch(sys.argv[2], sys.argv[3])
