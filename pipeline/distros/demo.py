"""The offline demo guest: a few-MB Linux from Debian packages, built by a real `packer build`.

Packer boots the demo kernel + initramfs directly (no installer, no ISO) with a blank disk; the
profile's prepare step assembles the guest (pipeline.demo, cached) with the build key baked in
and makes that blank disk. The kernel and initramfs are published next to the image: `run` and
the boot test boot them directly (`boot_info`). The guest's root is an initramfs, so its SSH
host keys are new on every boot (`ephemeral_root`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pipeline.base.fsutil import link_or_copy
from pipeline.base.run import run
from pipeline.contract import GuestView
from pipeline.distros import BootInfo, Report
from pipeline.distros.packer_base import PackerProfile
from pipeline.drivers import Prepared
from pipeline.model import Firmware, Image

if TYPE_CHECKING:
    from pipeline.contents.packages import Package
    from pipeline.plan import BuildPlan
    from pipeline.render.hcl import Block


class Demo(PackerProfile):
    name = "demo"
    title = "demo guest"
    tcg_duration = "The demo guest is tiny: about a minute even so"
    image_defaults: ClassVar[Mapping[str, Any]] = {"firmware": Firmware.BIOS}  # direct kernel boot: no firmware
    ephemeral_root = True
    systemd = False  # busybox init
    first_boot = "imagepipe"  # its init reads the seed's hostname, keys and boot.sh (no cloud-init)

    def blocks(self, image: Image, legacy: bool) -> list[Block]:
        from pipeline.render import demo  # noqa: PLC0415 (kept off the no-op build and the input hash)

        return demo.blocks(image, legacy, artifact_name=self.artifact_name(image))

    def prepared_variables(self, image: Image) -> list[str]:
        return ["base_disk", "kernel", "initrd", "source_date_epoch"]

    def prepare(self, plan: BuildPlan, stage: Path, report: Report) -> Prepared:
        """Assemble (or reuse) the demo guest with the build key baked in for root (the guest
        contract; the demo has only root), and a blank base disk."""
        from pipeline import contract, demo, keys  # noqa: PLC0415 (kept off the no-op build and the input hash)
        from pipeline.contents import packages  # noqa: PLC0415 (kept off the no-op build and the input hash)

        image = contract.with_build_key(plan.image, keys.public_key(plan.ssh_key), *plan.extra_keys)
        root = image.user("root")
        authorized = list(root.public_keys) if root else []
        guest = demo.assemble(plan.image_dir.parent, authorized, root.password_hash if root else None,
                              contract.root_password_ssh(image))
        kernel, initrd = stage / "vmlinuz", stage / "initrd.img"
        for src, dst in ((guest.kernel, kernel), (guest.initrd, initrd)):
            link_or_copy(src, dst)  # the cached files are never written again: a link is a copy
        base = stage / "inputs" / "base.qcow2"  # the driver removes stage/inputs before publishing
        base.parent.mkdir(exist_ok=True)
        run(["qemu-img", "create", "-q", "-f", "qcow2", base, f"{image.disk_size}M"])
        packages.write_deb_list(stage, guest.packages)  # read back by packages() below
        return Prepared(
            variables={
                "base_disk": str(base),
                "kernel": str(kernel),
                "initrd": str(initrd),
                "kernel_append": guest.append,
                "source_date_epoch": str(guest.source_date_epoch),
            },
            extra_files=(kernel, initrd),
        )

    def summary(self, image: Image, root: Path, output_dir: Path) -> dict[str, Any]:
        """Where the guest comes from and whether its Debian packages are cached already."""
        from pipeline import demo  # noqa: PLC0415 (kept off the no-op build and the input hash)

        debs = demo.cache_dir(output_dir) / "debs"
        count = len(list(debs.glob("*.deb"))) if debs.is_dir() else 0
        return {"guest": "Debian kernel + busybox + dropbear, assembled into an initramfs"
                         + (f" ({count} packages cached in {debs})" if count else
                            " (packages fetched with apt-get download on the first build)")}

    def packages(self, plan: BuildPlan, stage: Path, report: Report) -> list[Package]:
        """The Debian packages the guest was assembled from (recorded by prepare)."""
        from pipeline.contents import packages  # noqa: PLC0415 (kept off the no-op build and the input hash)

        return packages.read_deb_list(stage)

    def boot_info(self, image: Image) -> BootInfo:
        """Direct kernel boot with the files published next to the image."""
        from pipeline import demo  # noqa: PLC0415 (kept off the no-op build and the input hash)

        return BootInfo("vmlinuz", "initrd.img", demo.APPEND)


def guest_view(entries: Iterable[tuple[str, int, bytes]], append: str) -> GuestView:
    """What the demo initramfs (its entries, pipeline.demo.rootfs_entries) and its kernel command
    line give the guest contract."""
    files = {path: data for path, _mode, data in entries}
    text = {p: files.get(p, b"").decode() for p in ("root/.ssh/authorized_keys", "etc/dropbear/flags",
                                                    "etc/shadow", "etc/init.d/rcS", "etc/modules")}
    root_hash = text["etc/shadow"].split(":")[1] if text["etc/shadow"].startswith("root:") else "*"
    consoles = re.findall(r"console=(\w+)", append)
    return GuestView(
        keys={"root": frozenset(k for k in text["root/.ssh/authorized_keys"].splitlines() if k)},
        passwordless_sudo=frozenset(),  # only root: nobody needs sudo
        root_password_ssh=root_hash not in ("*", "!", "") and not {"-s", "-g"} & set(text["etc/dropbear/flags"].split()),
        console=consoles[-1] if consoles else None,
        power_button="etc/acpi/PWRF/00000080" in files and "\nacpid\n" in text["etc/init.d/rcS"]
        and "button" in text["etc/modules"].split(),
        guest_agent="usr/bin/qemu-ga" in files,
    )


PROFILE = Demo()
