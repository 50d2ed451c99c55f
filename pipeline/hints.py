"""Next-step hints that fit the host: how to get an image that is not built yet.

An image this host can build natively gets `invoke build IMAGE`; one it cannot (another arch, a
NixOS image on macOS) gets the remote route - build it on a fitting builder, then fetch it -
naming the configured builders of that arch, and for Packer-built images the slow local
alternative (`--accel tcg`). Pure: the host is described by its OS and `uname -m`.
"""

from __future__ import annotations

import platform

from pipeline import distros
from pipeline.host import HostFacts, KvmFacts
from pipeline.model import Config, Image


def host_facts(os_name: str | None = None, machine: str | None = None) -> HostFacts:
    """The little a hint needs to know about a host (no probe: OS and machine only)."""
    return HostFacts(os_name or platform.system().lower(), machine or platform.machine(),
                     KvmFacts(False, False, None), False)


def can_build_here(cfg: Config, image: Image, facts: HostFacts) -> bool:
    """True when this host builds `image` natively (same arch, or an engine without a build VM, and
    the profile does not object)."""
    profile = distros.profile(image)
    return (facts.arch is image.arch or not profile.build_vm) and profile.host_problem(image, facts, cfg) is None


def build_hint(cfg: Config, image: Image, facts: HostFacts | None = None) -> str:
    """How to get `image` published here: build it, or build it on a builder and fetch it."""
    facts = facts or host_facts()
    if can_build_here(cfg, image, facts):
        return f"build it first: invoke build {image.name}"
    return remote_route(cfg, image, facts)


def remote_route(cfg: Config, image: Image, facts: HostFacts) -> str:
    """Build on a builder of the image's arch, then fetch; the configured builders that fit."""
    arch = image.arch.value
    fitting = sorted(b.name for b in cfg.builders.values() if b.arch is image.arch)
    host = fitting[0] if len(fitting) == 1 else "HOST"
    route = (f"this host ({facts.os} {facts.machine}) cannot build {image.name} natively; build it on a Linux "
             f"{arch} builder and fetch it: invoke remote-sync-build {host} --image {image.name} && "
             f"invoke remote-fetch {host} {image.name}")
    lines = [route]
    if fitting:
        lines.append(f"configured {arch} builders: {', '.join(fitting)}")
    else:
        untyped = sorted(b.name for b in cfg.builders.values() if b.arch is None)
        lines.append(f"no builder with `arch: {arch}` under builders: in {cfg.source}"
                     + (f" (builders without an arch: {', '.join(untyped)})" if untyped else ""))
    if distros.profile(image).driver.name == "packer" and facts.arch is not None and facts.arch is not image.arch:
        lines.append(f"or emulate it here (hours): invoke build {image.name} --accel tcg")
    return "\n  ".join(lines)
