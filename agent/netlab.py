"""Network namespaces for the fleet lab: one "switch" namespace holding a Linux bridge, one
namespace per host joined to it by a veth pair, and per-host link faults.

Nothing here touches the root namespace's network: the bridge lives in the switch
namespace, each veth pair is created there with its far end moved straight into the
host's namespace (as ``eth0``), and every address is in a private /24 that exists only in
these namespaces. Faults are applied inside the host's namespace:

- random loss: an nftables ``inet`` table whose input and/or output chain drops
  ``numgen random mod 100 < P`` of the packets (loopback excepted);
- a rate limit: ``tc qdisc replace dev eth0 root tbf`` (egress of the host);
- partitions: the same table drops traffic to and from the addresses of other groups.

``netem`` is not in every kernel (not in this one), so there is no delay here.

Every namespace is named ``fxlab-<pid>-<n>-...``: ``close()`` removes this lab's, and
``cleanup_leftovers()`` (run by ``open()``) removes those of a process that no longer
exists (a run killed before it could clean up), never those of a live one.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass, field

PREFIX = "fxlab-"
TABLE = "fleetlab"
_counter = itertools.count()


class NetlabError(Exception):
    pass


@dataclass
class Host:
    name: str
    ns: str
    addr: str  # the host's address, without a port
    loss_in: int = 0  # percent of packets dropped on input
    loss_out: int = 0  # percent of packets dropped on output
    blocked: set[str] = field(default_factory=set)  # addresses cut off (a partition)
    rate_mbit: float = 0.0  # 0: no rate limit


def ip(*argv: str, check: bool = True, stdin: str | None = None) -> str:
    cmd = ["ip", *argv]
    res = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=30)
    if check and res.returncode != 0:
        raise NetlabError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
    return res.stdout


def in_ns(ns: str, *argv: str, check: bool = True, stdin: str | None = None) -> str:
    return ip("netns", "exec", ns, *argv, check=check, stdin=stdin)


@functools.lru_cache(maxsize=1)
def available() -> str | None:
    """None when namespaces, veth, nftables and tbf work here; else why not."""
    if os.geteuid() != 0:
        return "the fleet lab needs root (network namespaces)"
    for tool, pkg in (("ip", "iproute2"), ("tc", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"`{tool}` is missing (apt-get install {pkg})"
    ns = f"{PREFIX}{os.getpid()}-probe"
    try:
        ip("netns", "add", ns)
        ip("-n", ns, "link", "add", "p0", "type", "veth", "peer", "name", "p1")
        ip("-n", ns, "link", "set", "p0", "up")
        in_ns(ns, "nft", "-f", "-", stdin=_ruleset(Host("probe", ns, "10.0.0.1", 10)))
        in_ns(ns, "tc", "qdisc", "add", "dev", "p0", "root", "tbf", "rate", "2mbit",
              "burst", "16kb", "latency", "200ms")
    except (NetlabError, OSError, subprocess.TimeoutExpired) as e:
        return f"network namespaces cannot be used here: {e}"
    finally:
        ip("netns", "del", ns, check=False)
    return None


def _owner_alive(ns: str) -> bool:
    m = re.match(re.escape(PREFIX) + r"(\d+)-", ns)
    if m is None:
        return True  # not ours to judge
    try:
        os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lab_namespaces(prefix: str = PREFIX) -> list[str]:
    out = ip("netns", "list", check=False)
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if n.startswith(prefix)]


def remove_namespace(ns: str) -> None:
    """Kill every process in ``ns`` (its process group too), then delete it."""
    for pid in ip("netns", "pids", ns, check=False).split():
        with contextlib.suppress(OSError, ValueError):
            os.killpg(int(pid), signal.SIGKILL)
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    ip("netns", "del", ns, check=False)


def cleanup_leftovers() -> list[str]:
    """Remove the namespaces of labs whose process is gone; return their names."""
    gone = [ns for ns in lab_namespaces() if not _owner_alive(ns)]
    for ns in gone:
        remove_namespace(ns)
    return gone


def pick_subnet() -> str:
    """A 10.77.X prefix no address of the root namespace is in."""
    used = ip("-br", "addr", check=False)
    for x in range(256):
        if f"10.77.{x}." not in used:
            return f"10.77.{x}"
    raise NetlabError("no free 10.77.X.0/24 for the fleet lab")


def _ruleset(h: Host) -> str:
    blocked = ", ".join(sorted(h.blocked))
    chains = []
    for chain, hook, iface, peer, loss in (("input", "input", "iifname", "saddr", h.loss_in),
                                           ("output", "output", "oifname", "daddr",
                                            h.loss_out)):
        rules = [f'{iface} "lo" accept']
        if blocked:
            rules.append(f"ip {peer} {{ {blocked} }} drop")
        if loss:
            rules.append(f"numgen random mod 100 < {loss} drop")
        body = "\n    ".join(rules)
        chains.append(f"  chain {chain} {{\n    type filter hook {hook} priority 0; "
                      f"policy accept;\n    {body}\n  }}")
    # Adding then deleting makes the load atomic and idempotent: the old table goes.
    return (f"table inet {TABLE}\ndelete table inet {TABLE}\n"
            f"table inet {TABLE} {{\n" + "\n".join(chains) + "\n}\n")


class Netlab:
    """A bridge in a switch namespace and hosts plugged into it."""

    def __init__(self) -> None:
        self.prefix = f"{PREFIX}{os.getpid()}-{next(_counter)}"
        self.switch = f"{self.prefix}-sw"
        self.subnet = ""
        self.hosts: dict[str, Host] = {}
        self.namespaces: list[str] = []
        # Faults every new host gets before anything runs in it (loss on input, in %).
        self.default_loss = 0
        self.default_rate_mbit = 0.0

    def open(self) -> None:
        cleanup_leftovers()
        self.subnet = pick_subnet()
        self._add_ns(self.switch)
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", self.switch, "link", "set", "br0", "up")

    def _add_ns(self, ns: str) -> None:
        self.namespaces.append(ns)  # before creating it: close() removes it whatever happens
        ip("netns", "add", ns)
        ip("-n", ns, "link", "set", "lo", "up")

    def add_host(self, name: str) -> Host:
        i = len(self.hosts) + 1
        if i > 250:
            raise NetlabError("the fleet lab holds at most 250 hosts")
        h = Host(name, f"{self.prefix}-h{i}", f"{self.subnet}.{i}")
        self._add_ns(h.ns)
        port = f"v{i}"
        ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0",
           "netns", h.ns)
        ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
        ip("-n", h.ns, "addr", "add", f"{h.addr}/24", "dev", "eth0")
        ip("-n", h.ns, "link", "set", "eth0", "up")
        self.hosts[name] = h
        h.loss_in = self.default_loss
        self._apply_rules(h)
        if self.default_rate_mbit > 0:
            self.set_rate(name, self.default_rate_mbit)
        return h

    # --- faults -------------------------------------------------------------------------

    def _apply_rules(self, h: Host) -> None:
        in_ns(h.ns, "nft", "-f", "-", stdin=_ruleset(h))

    def set_loss(self, name: str, percent: int, direction: str = "input") -> None:
        """Drop ``percent`` % of the host's packets at random, on "input", "output" or
        "both" (loss on input of every host is that loss on every link)."""
        if not 0 <= percent <= 100 or direction not in ("input", "output", "both"):
            raise ValueError(f"bad loss {percent!r} {direction!r}")
        h = self.hosts[name]
        h.loss_in = percent if direction in ("input", "both") else 0
        h.loss_out = percent if direction in ("output", "both") else 0
        self._apply_rules(h)

    def set_rate(self, name: str, mbit: float) -> None:
        """Limit the host's egress to ``mbit`` Mbit/s with tbf (0: no limit)."""
        h = self.hosts[name]
        if mbit <= 0:
            in_ns(h.ns, "tc", "qdisc", "del", "dev", "eth0", "root", check=False)
        else:
            in_ns(h.ns, "tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate",
                  f"{int(mbit * 1000)}kbit", "burst", "16kb", "latency", "400ms")
        h.rate_mbit = max(mbit, 0.0)

    def partition(self, *groups: list[str]) -> None:
        """Cut every host off from the hosts of the other groups (both ways); hosts in
        no group keep talking to everyone."""
        where = {n: i for i, g in enumerate(groups) for n in g}
        for h in self.hosts.values():
            mine = where.get(h.name)
            h.blocked = {o.addr for o in self.hosts.values() if mine is not None
                         and where.get(o.name) not in (None, mine)}
            self._apply_rules(h)

    def heal(self) -> None:
        self.partition()

    # --- teardown -------------------------------------------------------------------------

    def close(self) -> None:
        """Kill what runs in this lab's namespaces and delete them (with their veths, the
        bridge, the nft tables and qdiscs, which live and die with them)."""
        for ns in reversed(self.namespaces):
            remove_namespace(ns)
        for ns in lab_namespaces(self.prefix + "-"):  # one created but not recorded
            remove_namespace(ns)
        self.namespaces.clear()
