"""How an image crosses the link to or from a builder: compressed or not, chosen per link.

Compression pays where the link is slower than the compressor: a 100 Mbit/s link carries 12.5 MB/s,
zstd compresses a disk image 2.5-3.5× at 100-300 MB/s on one core, so it moves the same image in
a third of the time. Where the builder is this machine (a loopback "link") or the link is faster
than the compressor, it only costs CPU. So a builder's `compress` setting:

    auto   (the default) off when the builder is this machine; else the link is measured by
           streaming bytes from the builder over the open connection (up to 0.5 s, less on a
           fast link): under 250 Mbit/s zstd (level 3: the ratio is what counts), faster lz4
           (it compresses faster than such a link carries, where zstd would be the bottleneck;
           zstd level 1 where lz4 is missing). The threshold sits low on purpose: a probe this
           short only ever underestimates (a young connection, a busy moment), and taking a fast
           link for a slow one costs more (zstd becomes the bottleneck) than the reverse.
    on     the best compressor both rsyncs have (zstd, lz4, zlibx, zlib)
    off    none
    zstd | lz4 | zlib   that one (both rsyncs must have it)

rsync names its compressor with --compress-choice from 3.2 on, and both ends must have it, so
the builder's `rsync --version` (read in the same round trip as its manifest) and this machine's
decide what can be used. openrsync (macOS) and rsync before 3.2 name none: plain `-z` (zlib)
then, or nothing for openrsync.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.base.errors import HostUnsuitable
from pipeline.builders.rsync import COMPRESSORS, RsyncVersion, compress_args, local_version, parse_version

# What the builder says about its end of the link (run there; `parse_facts` reads it): how it
# sees this connection ($SSH_CONNECTION), then its `rsync --version` (nothing where it has none).
FACTS = 'printf "%s\\n" "${SSH_CONNECTION:-}"; rsync --version 2>/dev/null || :'
SLOW_LINK = 250e6 / 8        # bytes/s below which the best ratio pays (zstd level 3); lz4 above


@dataclass(frozen=True)
class Wire:
    """The compression of one transfer, and why."""

    compress: str | None = None
    level: int | None = None
    named: bool = True           # both ends take --compress-choice
    why: str = "off"

    def rsync_args(self) -> list[str]:
        return compress_args(self.compress, self.level, named=self.named)

    @property
    def text(self) -> str:
        """e.g. "zstd level 3 (link measured at 95 Mbit/s)"."""
        if not self.compress:
            return f"uncompressed ({self.why})"
        level = f" level {self.level}" if self.level is not None else ""
        return f"{self.compress}{level} ({self.why})"


@dataclass(frozen=True)
class Facts:
    """The builder's end of the link."""

    rsync: RsyncVersion
    ssh_connection: str = ""     # "client port server port"

    @property
    def same_machine(self) -> bool:
        return same_machine(self.ssh_connection)


def parse_facts(text: str) -> Facts:
    """FACTS' output → Facts."""
    first, _, rest = text.partition("\n")
    return Facts(parse_version(rest), first.strip())


def for_link(target_name: str, setting: str, facts: Facts, measure: Callable[[float], float | None]) -> Wire:
    """`choose` between this machine's rsync and the builder's, as FACTS told."""
    return choose(setting, local_version(), facts.rsync, target_name, local_link=facts.same_machine,
                  measure=measure)


def same_machine(ssh_connection: str) -> bool:
    """True when the builder's $SSH_CONNECTION ("client port server port") shows a connection
    from this machine to itself: a loopback server address, or the client's own."""
    parts = ssh_connection.split()
    if len(parts) != 4:
        return False
    try:
        client, server = ipaddress.ip_address(parts[0]), ipaddress.ip_address(parts[2])
    except ValueError:
        return False
    return server.is_loopback or server == client


def rate_text(rate: float) -> str:
    bits = rate * 8
    return f"{bits / 1e9:.1f} Gbit/s" if bits >= 1e9 else f"{bits / 1e6:.0f} Mbit/s"


def choose(setting: str, here: RsyncVersion, there: RsyncVersion, builder: str, *, local_link: bool,
           measure: Callable[[float], float | None]) -> Wire:
    """The Wire for `setting` (a pipeline.model.Compress value) between this rsync (`here`) and the builder's
    (`there`). `local_link`: the builder is this machine. `measure(enough)`: the link's rate in
    bytes/s, looked at no longer than it takes to see `enough` (None when it could not be
    measured); called only for `auto` when it decides something."""
    common = here.common(there)
    named = here.named and there.named
    if setting == "off":
        return Wire(why="compress: off")
    if setting in COMPRESSORS:
        if setting not in common:
            raise HostUnsuitable(
                f"builder {builder}: compress: {setting} needs {setting} in both rsyncs (here {here.text}: "
                f"{', '.join(here.compress) or 'none'}; {builder} {there.text}: {', '.join(there.compress) or 'none'})",
                hint=f"set builders.{builder}.compress to auto or on in invoke.yaml, or install rsync 3.2 or later "
                     "on both machines")
        return Wire(setting, None, named, f"compress: {setting}")
    if not common:
        if setting == "on":
            raise HostUnsuitable(f"builder {builder}: compress: on, but {here.text} here and {there.text} there "
                             "have no compressor in common",
                             hint=f"set builders.{builder}.compress to auto or off, or install rsync 3.2 or later")
        return Wire(why=f"no compressor in common: {here.text} here, {there.text} on {builder}")
    best = common[0]
    if setting == "on":
        return Wire(best, None, named, "compress: on")
    if local_link:
        return Wire(why=f"{builder} is this machine")
    rate = measure(SLOW_LINK)
    if rate is None:
        return Wire(best, 3 if best == "zstd" else None, named, "link not measured")
    if rate >= SLOW_LINK:
        fast = "lz4" if "lz4" in common else best
        return Wire(fast, 1 if fast == "zstd" else None, named, f"link measured at {rate_text(rate)} or more")
    return Wire(best, 3 if best == "zstd" else None, named, f"link measured at {rate_text(rate)}")
