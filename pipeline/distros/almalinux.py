"""AlmaLinux: Packer's qemu builder + a kickstart, the installer ISO pinned in iso.lock.json.

The template is rendered by pipeline.render.almalinux, the kickstart by pipeline.render.kickstart;
both land under one folder per major release (`family`: almalinux10), computed only here. The
committed kickstart installs packages from the point release iso.lock.json pins (else the major
release). The prepare step resolves, fetches and verifies the ISO, stages the kickstart (with the
build's SSH key, and packages from the ISO's point release on the mirror in use) and a writable
UEFI variable store, and names the build login's password (environment only, never argv).

AlmaLinux 10 x86_64 needs an x86-64-v3 CPU; `variant: x86_64_v2` builds its x86_64_v2 edition
(media and packages under x86_64_v2/), on QEMU's Nehalem model as the official images do, so the
build itself proves the image runs on a v2 CPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pipeline.base.errors import HostUnsuitable
from pipeline.base.fsutil import write_if_changed
from pipeline.contract import GuestView, with_build_key
from pipeline.distros import Pin, Report
from pipeline.distros.packer_base import PackerProfile
from pipeline.drivers import Prepared
from pipeline.model import Accel, Arch, Image

if TYPE_CHECKING:
    from pipeline.contents.packages import Package
    from pipeline.host import HostFacts
    from pipeline.plan import BuildPlan
    from pipeline.render.hcl import Block

ISO_LOCK = "iso.lock.json"
V2 = "x86_64_v2"
V2_CPU_MODEL = "Nehalem"  # x86-64-v2, as AlmaLinux's own x86_64_v2 image builds use
SLIRP_HOST = "10.0.2.2"   # the host's loopback as the build VM (QEMU user networking) sees it


def major(image: Image) -> str:
    """The AlmaLinux major release of an image: `10` for 10, 10.1 and latest (iso.major_of)."""
    from pipeline.iso import major_of  # noqa: PLC0415 (kept off the no-op build and the input hash)

    return major_of(image.version)


class AlmaLinux(PackerProfile):
    name = "almalinux"
    title = "AlmaLinux"
    tcg_duration = "An AlmaLinux installation takes hours this way"
    lima = True

    def __init__(self) -> None:
        self.pin = IsoPin(self)
    variants: ClassVar[Mapping[Arch, tuple[str, ...]]] = {Arch.X86_64: (V2,)}
    # Packer compresses the qcow2 (disk_compression), as it always did before the option existed.
    image_defaults: ClassVar[Mapping[str, Any]] = {"compress_qcow2": True}

    def family(self, image: Image) -> str:
        """almalinux<major>: the folder of the template (packer/) and the kickstart (kickstart/)."""
        return f"almalinux{major(image)}"

    def kickstart_path(self, root: Path, image: Image) -> Path:
        """kickstart/<family>/<arch>/<image>/ks.cfg: a folder per image holding exactly the file
        Anaconda looks for, so it serves as Packer's http_directory and as the OEMDRV CD."""
        return root / "kickstart" / self.family(image) / image.arch.value / image.name / "ks.cfg"

    def blocks(self, image: Image, legacy: bool) -> list[Block]:
        from pipeline.render import almalinux  # noqa: PLC0415 (kept off the no-op build and the input hash)

        return almalinux.blocks(image, legacy, artifact_name=self.artifact_name(image))

    def rendered_files(self, image: Image, root: Path, source: str) -> dict[Path, str]:
        return {**super().rendered_files(image, root, source),
                self.kickstart_path(root, image): self.committed_kickstart(image, root, source)}

    def committed_kickstart(self, image: Image, root: Path, source: str = "invoke.yaml") -> str:
        """The kickstart as committed: no build key, packages from the pinned point release."""
        from pipeline import iso  # noqa: PLC0415 (kept off the no-op build and the input hash)
        from pipeline.render import kickstart  # noqa: PLC0415 (kept off the no-op build and the input hash)

        return kickstart.render(image, source, iso.committed_repo_base(image, root))

    def cpu_level(self, image: Image) -> int | None:
        """x86_64: v3 for AlmaLinux 10, v2 for its x86_64_v2 variant (aarch64: no levels)."""
        if image.arch is not Arch.X86_64:
            return None
        return 2 if image.variant == V2 else 3

    def cpu_model(self, image: Image, accel: Accel) -> str:
        return V2_CPU_MODEL if image.variant == V2 else accel.cpu_model

    def plan_variables(self, plan: BuildPlan) -> dict[str, str]:
        return {"ssh_timeout": plan.ssh_timeout}

    def guest_agent(self, image: Image) -> bool:
        return True  # qemu-guest-agent is installed and enabled by the kickstart

    def input_files(self, root: Path, image: Image) -> list[Path]:
        folder = self.kickstart_path(root, image).parent
        return [self.template(root, image), *_tree(folder)]

    def input_parts(self, root: Path, image: Image) -> dict[str, str]:
        """The image's own iso.lock.json entry (other images' pins do not count)."""
        path = root / ISO_LOCK
        if not path.is_file():
            return {}
        raw = path.read_bytes()
        try:
            entry = json.loads(raw).get("images", {}).get(image.name)
        except (ValueError, AttributeError):
            return {"iso.lock": "unreadable:" + hashlib.sha256(raw).hexdigest()}
        if entry is None:
            return {}
        return {"iso.lock": hashlib.sha256(json.dumps(entry, sort_keys=True).encode()).hexdigest()}

    def needed_tools(self, image: Image, facts: HostFacts | None = None) -> dict[str, str]:
        need = super().needed_tools(image, facts)
        if image.arch is Arch.AARCH64:
            # Packer makes the OEMDRV CD with xorriso or mkisofs; without them it falls back to
            # macOS's hdiutil, whose label udev does not see, and the installer never starts.
            need["xorriso"] = f"the OEMDRV kickstart CD of {image.name}"
        return need

    def prepared_variables(self, image: Image) -> list[str]:
        names = ["iso_url", "iso_checksum", "kickstart_dir", "packages_file"]
        from pipeline.render.almalinux import uses_uefi  # noqa: PLC0415 (kept off the no-op build and the input hash)

        return names + (["efi_firmware_code", "efi_firmware_vars"] if uses_uefi(image) else [])

    def prepare(self, plan: BuildPlan, stage: Path, report: Report) -> Prepared:
        """Resolve, fetch and verify the ISO, stage the kickstart and a UEFI variable store under
        <stage>/inputs, and name the build login's password (environment only, never argv)."""
        from pipeline import iso, keys  # noqa: PLC0415 (kept off the no-op build and the input hash)
        from pipeline.render.almalinux import uses_uefi  # noqa: PLC0415 (kept off the no-op build and the input hash)

        image = plan.image
        password = ssh_password(image)
        mirrors = iso.Mirrors.from_env()
        local = iso.ensure(image, plan.root, cache_dir=plan.image_dir.parent / ".cache" / "iso", mirrors=mirrors,
                           report=report)
        repo, note = iso.staged_repo_base(image, local, mirrors)
        if note:
            report(f"note: {note}")
        inputs = stage / "inputs"
        inputs.mkdir(parents=True, exist_ok=True)
        staged = self.stage_kickstart(image, plan.root, inputs, report, keys.public_key(plan.ssh_key), guest_url(repo),
                                      also=plan.extra_keys)
        values = {
            "iso_url": str(local.path),
            "iso_checksum": f"sha256:{local.sha256}",
            "kickstart_dir": str(staged),
            "ssh_username": image.ssh_user,
            "packages_file": str(collected_file(stage)),
        }
        if uses_uefi(image):
            values.update(firmware_vars(plan, inputs))
        return Prepared(variables=values, secret_env={"ssh_password": password})

    def stage_kickstart(self, image: Image, root: Path, inputs: Path, report: Report, build_key: str,
                        repo_base: str, also: tuple[str, ...] = ()) -> Path:
        """The kickstart of this build in its own folder: rendered from the config (as the
        template is) with the build's SSH key for ssh_user and the build's package repo. A
        committed copy that differs from the config's rendering is pointed out (users read it)."""
        from pipeline.render import kickstart  # noqa: PLC0415 (kept off the no-op build and the input hash)

        committed = self.kickstart_path(root, image)
        if not committed.is_file() or committed.read_text(encoding="utf-8") != self.committed_kickstart(image, root):
            report(f"note: {committed.relative_to(root)} is not what invoke.yaml renders (building with the"
                   " rendered one): run invoke render and commit it")
        folder = inputs / "kickstart"
        folder.mkdir(parents=True, exist_ok=True)
        text = kickstart.render(with_build_key(image, build_key, *also), repo_base=repo_base)
        (folder / "ks.cfg").write_text(text, encoding="utf-8")
        return folder

    def summary(self, image: Image, root: Path, output_dir: Path) -> dict[str, Any]:
        """The kickstart, the ISO a build would use (iso.lock.json / iso:, never downloaded) and
        the package repo of the committed kickstart (a build stages its own: the ISO's release)."""
        from pipeline import iso  # noqa: PLC0415 (kept off the no-op build and the input hash)

        kickstart = self.kickstart_path(root, image)
        found = iso.describe(image, root, output_dir / ".cache" / "iso")
        problem = found.pop("problem", None)
        variables = ({"iso_url": found.get("url") or found.get("path"), "iso_checksum": f"sha256:{found['sha256']}"}
                     if len(str(found.get("sha256", ""))) == 64 else {})
        return {"kickstart": str(kickstart) + ("" if kickstart.is_file() else " (MISSING: run invoke render)"),
                "iso": found, "package repo": f"{iso.committed_repo_base(image, root)} (the committed kickstart's; a build"
                                " uses the ISO's point release, on the vault once it left the mirror)",
                "variables": variables, "problems": [problem] if problem else []}

    def packages(self, plan: BuildPlan, stage: Path, report: Report) -> list[Package]:
        """Every RPM of the image, as the guest listed it (downloaded by the template)."""
        from pipeline.contents import packages  # noqa: PLC0415 (kept off the no-op build and the input hash)

        return packages.read_rpm_list(stage)

class IsoPin(Pin):
    """The installer ISO, pinned to a point release in iso.lock.json; the committed kickstart
    follows it (it installs packages of that point release)."""

    what = "installer ISO"

    def __init__(self, profile: AlmaLinux) -> None:
        self.profile = profile

    def configured(self, image: Image) -> str | None:
        return f"uses the configured iso {image.iso}: nothing to refresh" if image.iso else None

    def refresh(self, root: Path, image: Image) -> str:
        """Re-resolve the ISO (10 / latest / 10.1 -> a point release) and pin it in iso.lock.json."""
        from pipeline import iso  # noqa: PLC0415 (kept off the no-op build and the input hash)

        entry = iso.resolve(image, iso.Mirrors.from_env())
        entries = iso.read_lock(root)
        before = entries.get(image.name)
        entries[image.name] = entry
        iso.write_lock(root, entries)
        change = "unchanged" if before == entry else f"updated from {before.version}" if before else "pinned"
        path = self.profile.kickstart_path(root, image)
        rewrote = write_if_changed(path, self.profile.committed_kickstart(image, root))
        also = f"; {path.relative_to(root)} follows it" if rewrote else ""
        return f"{entry.version} ({entry.source}, sha256 {entry.sha256[:12]}…, CHECKSUM {entry.signature}) {change}{also}"


def collected_file(stage: Path) -> Path:
    """Where Packer downloads the guest's package list (the folder exists before Packer runs)."""
    from pipeline.contents import packages  # noqa: PLC0415 (kept off the no-op build and the input hash)

    folder = stage / packages.COLLECTED
    folder.mkdir(parents=True, exist_ok=True)
    return folder / packages.RPM_LIST


def _tree(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []


def ssh_password(image: Image, env: Mapping[str, str] | None = None) -> str:
    """A password Packer may also try (the build key, which the staged kickstart authorizes, is
    what logs in): $IMAGEPIPE_SSH_PASSWORD, else the development default of a shipped hash, else ""."""
    from pipeline.render.almalinux import PASSWORD_ENV  # noqa: PLC0415 (kept off the no-op build and the input hash)
    from pipeline.render.kickstart import DEVELOPMENT_HASHES  # noqa: PLC0415 (kept off the no-op build and the input hash)

    env = os.environ if env is None else env
    if PASSWORD_ENV in env:
        return env[PASSWORD_ENV]
    user = image.user(image.ssh_user)
    return DEVELOPMENT_HASHES.get(user.password_hash or "", "") if user is not None else ""


def guest_url(url: str) -> str:
    """`url` as the build VM reaches it: a mirror on the host's loopback is 10.0.2.2 to a guest
    on QEMU's user network (the installer runs there)."""
    return re.sub(r"^(\w+://)(127\.0\.0\.1|localhost)(?=[:/]|$)", rf"\g<1>{SLIRP_HOST}", url)


def guest_view(kickstart_text: str) -> GuestView:
    """What a rendered kickstart gives the guest contract (pipeline.contract), read back with
    pykickstart (the test extra): keys, sudo drop-ins, root over SSH, console, power, agent."""
    from pykickstart.constants import KS_SCRIPT_POST
    from pykickstart.parser import KickstartParser
    from pykickstart.version import RHEL10, makeVersion

    handler = makeVersion(RHEL10)
    KickstartParser(handler).readKickstartFromString(kickstart_text)
    keys: dict[str, set[str]] = {}
    for entry in handler.sshkey.sshUserList:
        keys.setdefault(entry.username, set()).add(entry.key)
    post = "\n".join(s.script for s in handler.scripts if s.type == KS_SCRIPT_POST)
    sudo = set(re.findall(r"^printf '%s\\n' '?(\S+) ALL=\(ALL\) NOPASSWD: ALL'? > /etc/sudoers\.d/", post, re.MULTILINE))
    consoles = re.findall(r"console=(\w+)", handler.bootloader.appendLine or "")
    root = handler.rootpw
    return GuestView(
        keys={user: frozenset(k) for user, k in keys.items()},
        passwordless_sudo=frozenset(sudo),
        root_password_ssh=bool(root.password and not root.lock and root.allow_ssh),
        console=consoles[-1] if consoles else None,
        # systemd-logind powers off on the power key unless told otherwise (HandlePowerKey)
        power_button="HandlePowerKey" not in kickstart_text,
        guest_agent="qemu-guest-agent" in handler.packages.packageList
        and "qemu-guest-agent" in handler.services.enabled,
    )


def firmware_vars(plan: BuildPlan, inputs: Path) -> dict[str, str]:
    """Firmware code path and a per-build writable copy of the variable store."""
    fw = plan.firmware
    if fw is None:
        raise HostUnsuitable(f"{plan.image.name} boots with UEFI but no firmware was chosen", "see invoke doctor")
    store = inputs / "efivars.fd"
    if fw.vars:
        shutil.copyfile(fw.vars, store)
    else:  # code-only firmware (QEMU_EFI_AARCH64): an empty store of the same flash size
        with open(store, "wb") as f:
            f.truncate(Path(fw.code).stat().st_size)
    store.chmod(0o644)
    return {"efi_firmware_code": str(fw.code), "efi_firmware_vars": str(store)}


PROFILE = AlmaLinux()
