"""`invoke doctor`: what this host has, what the configured images need, and what is missing.

`report(cfg, facts)` is a pure function from configuration + host facts to a Report, so the same
code judges a remote builder's facts. Install hints name the host's own package manager (apt,
dnf, brew, nix: from the facts). The exit code (`Report.exit_code`) follows the exit-code table of README.md:
127 when a required tool is missing, 3 when the host cannot do it (no UEFI firmware for an
image of its arch), else 0; a bad configuration (2) or an unreachable builder (4) fails before
a report exists.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline import distros
from pipeline.base.errors import ImagepipeError
from pipeline.base.run import install_hint
from pipeline.base.units import mib
from pipeline.host import HostFacts, missing_for
from pipeline.model import Arch, Config, Firmware
from pipeline.nixmachines import DISK_IMAGE_FEATURES
from pipeline.origin import ToolOrigin, plugins_note
from pipeline.plan import choose_accel

LOW_DISK = 10 * 1024**3


@dataclass(frozen=True)
class ToolLine:
    name: str
    found: bool
    version: str | None
    required: bool
    why: str
    hint: str | None


@dataclass(frozen=True)
class Report:
    host: str
    tools: list[ToolLine]
    accel: str
    accel_reason: str
    firmware: dict[str, str | None]
    free_disk: int | None
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    nix_builders: list[dict[str, Any]] = field(default_factory=list)  # nix's remote builders and what they can build
    exit_code: int = 0                 # 127 a required tool is missing, else 3 the host cannot do it
    package_manager: str | None = None
    cpu_level: str | None = None       # "x86-64-v3" (x86 hosts whose flags were read)
    packer: dict[str, Any] | None = None  # where the packer came from and what it supports (origin.ToolOrigin)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def needed_tools(cfg: Config, facts: HostFacts) -> dict[str, str]:
    """tool → why it is needed, for the images this host would build or run."""
    need: dict[str, str] = {"qemu-img": "verifying and converting images", "ssh": "logging in to VMs and builders"}
    reasons: dict[str, list[str]] = {}
    for image in sorted(cfg.images.values(), key=lambda i: i.name):
        profile = distros.profile(image)
        native = image.arch is facts.arch
        if not native or profile.host_problem(image, facts, cfg) is not None:
            continue  # built elsewhere (or under explicit emulation): not needed here
        for tool, why in profile.needed_tools(image, facts).items():
            reasons.setdefault(tool, []).append(why)
    for tool, whys in reasons.items():
        if tool not in need:
            need[tool] = "; ".join(dict.fromkeys(whys))
    for arch in Arch:
        mine = [i.name for i in cfg.images.values() if i.arch is arch]
        if mine and (arch is facts.arch or (arch is Arch.AARCH64 and facts.os == "darwin")):
            need.setdefault(arch.qemu_binary, "running " + ", ".join(sorted(mine)))
    if cfg.builders:
        need["rsync"] = "syncing with builders " + ", ".join(cfg.builders)
    return need


def report(cfg: Config, facts: HostFacts, where: str = "this host", packer: ToolOrigin | None = None) -> Report:
    """Judge `facts` against what the configuration needs (`packer`: where its packer came from)."""
    need = needed_tools(cfg, facts)
    manager = facts.package_manager
    lines = []
    problems: list[str] = []
    warnings: list[str] = []
    codes: list[int] = []
    for name, tool in sorted(facts.tools.items()):
        required = name in need
        hint = None if tool.found else install_hint(name, manager)
        if name == "packer" and packer is not None and packer.kind == "missing" and packer.path:
            hint = f"PACKER={packer.path} is not an executable file: point PACKER at the packer binary, or unset it"
        lines.append(ToolLine(name, tool.found, tool.version, required, need.get(name, "optional"), hint))
        if required and not tool.found:
            problems.append(f"{name} is missing (needed for {need[name]}): {hint}")
            codes.append(127)
    host_arch = facts.arch or Arch.X86_64
    try:
        choice = choose_accel(cfg.defaults.accel, facts, host_arch)
        accel, reason = choice.accel.value, choice.reason
        if choice.fallback:
            warnings.append(f"no hardware acceleration: {reason}")
    except ImagepipeError as exc:
        accel, reason = "none", exc.message
    firmware = {a.value: (fw.code + f" ({fw.source})" if (fw := facts.firmware.get(a)) else None) for a in Arch}
    for img in cfg.images.values():
        if img.firmware is Firmware.UEFI and facts.firmware.get(img.arch) is None and img.arch is host_arch:
            problems.append(f"no UEFI firmware for {img.arch.value} (needed by {img.name}): "
                            f"{install_hint('uefi-' + img.arch.value, manager)}")
            codes.append(3)
    warnings += cpu_level_warnings(cfg, facts)
    if facts.free_disk is not None and facts.free_disk < LOW_DISK:
        warnings.append(f"only {mib(facts.free_disk)} free under {cfg.output_dir}")
    if facts.nix_builders_error:
        warnings.append(f"nix's builders cannot be read: {facts.nix_builders_error}")
    return Report(f"{where} ({facts.os} {facts.machine})", lines, accel, reason, firmware,
                  facts.free_disk, problems, warnings, nix_builders(cfg, facts), exit_code=max(codes, default=0),
                  package_manager=manager,
                  cpu_level=f"x86-64-v{facts.cpu_level}" if facts.cpu_level is not None else None,
                  packer=packer_line(packer, facts) if packer is not None else None)


def packer_line(origin: ToolOrigin, facts: HostFacts) -> dict[str, Any]:
    """Where the packer came from and whether it knows required_plugins / packer init."""
    found = origin.kind != "missing" and facts.tool("packer").found
    return {**origin.as_json(), "plugins": plugins_note(facts.version("packer")) if found else None}


def nix_builders(cfg: Config, facts: HostFacts) -> list[dict[str, Any]]:
    """nix's configured remote builders, each with the images nix builds that it can take (their
    system, with what make-disk-image.nix needs: kvm)."""
    nixos = sorted((i for i in cfg.images.values() if distros.profile(i).driver.name == "nix"), key=lambda i: i.name)
    rows = []
    for m in facts.nix_builders:
        usable = [i.name for i in nixos if m.can_build(i.arch.nix_system, DISK_IMAGE_FEATURES)]
        rows.append({**m.as_json(), "usable_for": usable,
                     "not_usable": {i.name: m.lacks(i.arch.nix_system, DISK_IMAGE_FEATURES)
                                    for i in nixos if i.name not in usable}})
    return rows


def cpu_level_warnings(cfg: Config, facts: HostFacts) -> list[str]:
    """Images whose guest needs a higher x86-64 level than this CPU: a KVM/HVF build is refused."""
    out = []
    for img in sorted(cfg.images.values(), key=lambda i: i.name):
        need = distros.profile(img).cpu_level(img)
        if need is not None and img.arch is facts.arch and facts.cpu_level is not None and facts.cpu_level < need:
            out.append(f"{img.name} needs an x86-64-v{need} CPU and this one is x86-64-v{facts.cpu_level} "
                       f"(lacks {' '.join(missing_for(facts.cpu_flags or (), need))}): build it under TCG "
                       "(--accel tcg, QEMU >= 7.2), on another host, or as `variant: x86_64_v2`")
    return out


def format_text(r: Report) -> str:
    """The human-readable doctor output."""
    managed = f" · installs with {r.package_manager}" if r.package_manager else ""
    out = [f"imagepipe doctor — {r.host}{managed}", "", "tools:"]
    for t in r.tools:
        state = f"{t.version or 'found'}" if t.found else "MISSING"
        need = f"required: {t.why}" if t.required else "optional"
        out.append(f"  {'✔' if t.found else ('✘' if t.required else '-')} {t.name:20} {state:12} {need}")
        if not t.found and t.hint:
            out.append(f"      {t.hint}")
        if t.name == "packer" and t.found and r.packer:
            out.append(f"      from {r.packer['description']}")
            if r.packer["plugins"]:
                out.append(f"      {r.packer['plugins']}")
    out += ["", f"accelerator: {r.accel} — {r.accel_reason}"]
    if r.cpu_level:
        out.append(f"CPU level:   {r.cpu_level}")
    out += ["", "UEFI firmware:"]
    out += [f"  {arch:8} {path or 'not found'}" for arch, path in r.firmware.items()]
    free = mib(r.free_disk) if r.free_disk is not None else "unknown"
    out += ["", f"free disk under output/: {free}"]
    out += ["", "nix's remote builders:" if r.nix_builders else "nix's remote builders: none configured"]
    for b in r.nix_builders:
        feats = ", ".join(b["supported_features"]) or "no features"
        if b["mandatory_features"]:
            feats += f" (mandatory: {', '.join(b['mandatory_features'])})"
        out.append(f"  {b['uri']}  {', '.join(b['systems'])}; {feats}  [{b['source']}]")
        out.append(f"      usable for: {', '.join(b['usable_for']) or 'none of the configured NixOS images'}")
        out += [f"      not for {name}: {why}" for name, why in b["not_usable"].items()]
    if r.warnings:
        out += ["", "warnings:"] + [f"  ! {w}" for w in r.warnings]
    out += ["", "problems:" if r.problems else "everything the configured images need is here."]
    out += [f"  ✘ {p}" for p in r.problems]
    return "\n".join(out)
