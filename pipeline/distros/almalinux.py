"""AlmaLinux: Packer's qemu builder + a kickstart, the installer ISO pinned in iso.lock.json.

The template is rendered by pipeline.render.almalinux, the kickstart by pipeline.render.kickstart;
both land under one folder per major release (`family`: almalinux10), computed only here. The
prepare step resolves, fetches and verifies the ISO, stages the kickstart and a writable UEFI
variable store, and names the build login's password (environment only, never argv).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pipeline.config import Arch, Image
from pipeline.distros import Report
from pipeline.distros.packer_base import PackerProfile
from pipeline.drivers import Prepared
from pipeline.errors import HostUnsuitable, UsageError

if TYPE_CHECKING:
    from pipeline.host import HostFacts
    from pipeline.packages import Package
    from pipeline.plan import BuildPlan
    from pipeline.render.hcl import Block

ISO_LOCK = "iso.lock.json"


def major(image: Image) -> str:
    """The AlmaLinux major release of an image: `10` for 10, 10.1 and latest (iso.major_of)."""
    from pipeline.iso import major_of

    return major_of(image.version)


class AlmaLinux(PackerProfile):
    name = "almalinux"
    title = "AlmaLinux"
    tcg_duration = "An AlmaLinux installation takes hours this way"
    pin = "installer ISO"
    lima = True
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
        from pipeline.render import almalinux

        return almalinux.blocks(image, legacy)

    def rendered_files(self, image: Image, root: Path, source: str) -> dict[Path, str]:
        from pipeline.render import kickstart

        return {**super().rendered_files(image, root, source),
                self.kickstart_path(root, image): kickstart.render(image, source)}

    def input_files(self, root: Path, image: Image) -> list[Path]:
        folder = self.kickstart_path(root, image).parent
        return [self.template(root, image), *_tree(folder)]

    def input_parts(self, root: Path, image: Image) -> dict[str, str]:
        """The image's own iso.lock.json entry (other images' pins do not count)."""
        import hashlib

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
        from pipeline.render.almalinux import uses_uefi

        return names + (["efi_firmware_code", "efi_firmware_vars"] if uses_uefi(image) else [])

    def prepare(self, plan: BuildPlan, stage: Path, report: Report) -> Prepared:
        """Resolve, fetch and verify the ISO, stage the kickstart and a UEFI variable store under
        <stage>/inputs, and name the build login's password (environment only, never argv)."""
        from pipeline import iso
        from pipeline.render.almalinux import uses_uefi

        image = plan.image
        password = ssh_password(image)  # fails before any download when no login is possible
        local = iso.ensure(image, plan.root, cache_dir=plan.image_dir.parent / ".cache" / "iso", report=report)
        inputs = stage / "inputs"
        inputs.mkdir(parents=True, exist_ok=True)
        values = {
            "iso_url": str(local.path),
            "iso_checksum": f"sha256:{local.sha256}",
            "kickstart_dir": str(self.stage_kickstart(image, plan.root, inputs, report)),
            "ssh_username": image.ssh_user,
            "packages_file": str(collected_file(stage)),
        }
        if uses_uefi(image):
            values.update(firmware_vars(plan, inputs))
        return Prepared(variables=values, secret_env={"ssh_password": password})

    def stage_kickstart(self, image: Image, root: Path, inputs: Path, report: Report) -> Path:
        """The kickstart rendered from the config (as the template is), in its own folder; a
        committed copy that differs is pointed out, since users read that one."""
        from pipeline.render import kickstart

        text = kickstart.render(image)
        committed = self.kickstart_path(root, image)
        if not committed.is_file() or committed.read_text(encoding="utf-8") != text:
            report(f"note: {committed.relative_to(root)} is not what invoke.yaml renders (building with the"
                   " rendered one): run invoke render and commit it")
        folder = inputs / "kickstart"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "ks.cfg").write_text(text, encoding="utf-8")
        return folder

    def packages(self, plan: BuildPlan, stage: Path, report: Report) -> list[Package]:
        """Every RPM of the image, as the guest listed it (downloaded by the template)."""
        from pipeline import packages

        return packages.read_rpm_list(stage)

    def uses_configured_input(self, image: Image) -> str | None:
        return f"uses the configured iso {image.iso}: nothing to refresh" if image.iso else None

    def refresh_pin(self, root: Path, image: Image) -> str:
        """Re-resolve the ISO (10 / latest / 10.1 -> a point release) and pin it in iso.lock.json."""
        from pipeline import iso

        entry = iso.resolve(image, iso.Mirrors.from_env())
        entries = iso.read_lock(root)
        before = entries.get(image.name)
        entries[image.name] = entry
        iso.write_lock(root, entries)
        change = "unchanged" if before == entry else f"updated from {before.version}" if before else "pinned"
        return f"{entry.version} ({entry.source}, sha256 {entry.sha256[:12]}…) {change}"


def collected_file(stage: Path) -> Path:
    """Where Packer downloads the guest's package list (the folder exists before Packer runs)."""
    from pipeline import packages

    folder = stage / packages.COLLECTED
    folder.mkdir(parents=True, exist_ok=True)
    return folder / packages.RPM_LIST


def _tree(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []


def ssh_password(image: Image, env: Mapping[str, str] | None = None) -> str:
    """The build login's password: $IMAGEPIPE_SSH_PASSWORD, else the well-known development
    password when the account still has the shipped hash, else "" when it has public keys."""
    from pipeline.render.almalinux import PASSWORD_ENV
    from pipeline.render.kickstart import DEVELOPMENT_HASHES

    env = os.environ if env is None else env
    if PASSWORD_ENV in env:
        return env[PASSWORD_ENV]
    user = image.user(image.ssh_user)
    if user is not None and user.password_hash in DEVELOPMENT_HASHES:
        return DEVELOPMENT_HASHES[user.password_hash]
    if user is not None and user.public_keys:
        return ""  # key login: the private key must match one of the user's public_keys
    raise UsageError(
        f"cannot log in as {image.ssh_user!r} during the build of {image.name}: its password is not a"
        " development default and it has no public keys",
        f"export {PASSWORD_ENV}=<its password> (kept out of argv and logs), or add the build key's"
        f" public key to images.{image.name}.users[].public_keys",
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
