"""What every Packer-built distro shares: its template's place, the tools, the driver binding."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.distros import Profile

if TYPE_CHECKING:
    from pipeline.drivers.packer import PackerDriver
    from pipeline.host import HostFacts
    from pipeline.model import Image
    from pipeline.plan import BuildPlan
    from pipeline.render.hcl import Block


class PackerProfile(Profile):
    """A distro built by Packer's qemu builder from a template rendered by `blocks()`."""

    @property
    def driver(self) -> PackerDriver:
        from pipeline.drivers.packer import PackerDriver  # noqa: PLC0415 (kept off the no-op build and the input hash)

        return PackerDriver(self)

    def blocks(self, image: Image, legacy: bool) -> list[Block]:
        """The whole template (legacy=True: for Packer < 1.7, without the plugin block)."""
        raise NotImplementedError

    def template(self, root: Path, image: Image) -> Path:
        """packer/<family>/<arch>/<image>.pkr.hcl (committed; the current-Packer rendering)."""
        return root / "packer" / self.family(image) / image.arch.value / f"{image.name}.pkr.hcl"

    def rendered_files(self, image: Image, root: Path, source: str) -> dict[Path, str]:
        from pipeline.render.hcl import dumps  # noqa: PLC0415 (kept off the no-op build and the input hash)

        return {self.template(root, image): dumps(self.blocks(image, False))}

    def plan_variables(self, plan: BuildPlan) -> dict[str, str]:
        """Template variables the plan decides (AlmaLinux: its ssh_timeout), passed with -var."""
        return {}

    def hash_tools(self, image: Image) -> list[str]:
        # Packer major.minor (1.7 brought plugins) and the QEMU that runs the installer
        return ["packer", image.arch.qemu_binary]

    def needed_tools(self, image: Image, facts: HostFacts | None = None) -> dict[str, str]:
        return {"packer": f"building {image.name}", image.arch.qemu_binary: f"the VM that builds {image.name}",
                "qemu-img": "verifying images"}
