"""Lima (macOS alternative for AlmaLinux): `invoke lima-start`, `invoke lima-shell`."""

from __future__ import annotations

import os
import shlex
from typing import TYPE_CHECKING

from invoke import Context

from pipeline import distros
from pipeline.base.errors import UsageError
from pipeline.model import Arch
from pipeline.tasks.common import load_config, say, task

if TYPE_CHECKING:
    from pipeline.model import Config, Image


def _image(c: Context, name: str | None) -> tuple[Config, Image]:
    """The named AlmaLinux image, or the one for this host's arch."""
    cfg = load_config(c)
    if name:
        image = cfg.image(name)
    else:
        import platform  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

        arch = Arch.from_machine(platform.machine())
        found = next((i for _, i in sorted(cfg.images.items()) if distros.profile(i).lima and i.arch is arch), None)
        if found is None:
            raise UsageError(f"no AlmaLinux image for {platform.machine()} in the configuration",
                             "name one: invoke lima-start -i IMAGE")
        image = found
    if not distros.profile(image).lima:
        raise UsageError(f"{image.name} is a {image.distro} image: Lima runs the AlmaLinux cloud image")
    return cfg, image


@task(help={"image": "AlmaLinux image whose cpus/memory/disk to use (default: the one for this host's arch)"})
def lima_start(c: Context, image: str | None = None) -> None:
    """Start AlmaLinux 10 under Lima (generic cloud image, digest-pinned; vz on macOS >= 13)."""
    import platform  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

    from pipeline.base.fsutil import write_if_changed  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)
    from pipeline.base.run import stream, which  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)
    from pipeline.iso import Mirrors, cloud_image  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)
    from pipeline.render import lima  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

    cfg, img = _image(c, image)
    which("limactl")  # before any download: a missing tool is the first thing to say
    cloud = cloud_image(img, Mirrors.from_env())
    path = cfg.output_dir / "lima" / f"{lima.instance_name(img)}.yaml"
    if write_if_changed(path, lima.render(img, cloud, lima.vm_type(platform.system().lower(), platform.mac_ver()[0]))):
        say(f"wrote {path}")
    stream(["limactl", "start", f"--name={lima.instance_name(img)}", "--tty=false", str(path)], on_line=say)
    say(f"started: invoke lima-shell {img.name}")


@task(help={"image": "AlmaLinux image (default: the one for this host's arch)"})
def lima_shell(c: Context, image: str | None = None) -> None:
    """Open a shell in the Lima instance started by lima-start."""
    from pipeline.base.run import which  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)
    from pipeline.render import lima  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

    _, img = _image(c, image)
    argv = [which("limactl"), "shell", lima.instance_name(img)]
    say(f"$ {shlex.join(argv)}")
    # An interactive shell needs this terminal: replace the process instead of capturing output.
    os.execv(argv[0], argv)
