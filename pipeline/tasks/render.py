"""Generated files: `invoke render` (templates, kickstarts), `invoke update-iso` (ISO pins) and
`invoke update-flake` (the NixOS flake's lock, written by nix)."""

from __future__ import annotations

from invoke import Context

from pipeline import distros
from pipeline.base.errors import UsageError
from pipeline.tasks.common import load_config, say, task


@task(help={"image": "render only this image (default: every image)"})
def render(c: Context, image: str | None = None) -> None:
    """Write the committed Packer templates and kickstarts from invoke.yaml (only what changed).

    It writes `packer/.../*.pkr.hcl`, `kickstart/almalinux10/<arch>/<image>/ks.cfg` and
    `nixos/params/<image>.json`; `invoke lint` fails when a committed file drifts from them.
    """
    from pipeline.committed import rendered_files, write_all  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

    cfg = load_config(c)  # every config problem is reported before anything is written
    files = rendered_files(cfg, [image] if image else None)
    written = write_all(files)
    for path in written:
        say(f"wrote {path.relative_to(cfg.root)}")
    say(f"{len(written)} of {len(files)} generated files changed" if written else f"all {len(files)} generated files up to date")


@task(help={"image": "pin only this image (default: every image whose distro pins an input)"})
def update_iso(c: Context, image: str | None = None) -> None:
    """Resolve AlmaLinux versions to point releases and pin URL + sha256 in iso.lock.json.

    `10`, `latest` or `10.1` becomes a point release with its ISO's URL and sha256 (from the
    mirror, else vault.almalinux.org). The committed kickstart follows the pin: it names the
    packages of that point release. Commit iso.lock.json.
    """
    cfg = load_config(c)
    names = [image] if image else sorted(n for n, i in cfg.images.items() if distros.profile(i).pin)
    for name in names:
        img = cfg.image(name)
        pin = distros.profile(img).pin
        if pin is None:
            raise UsageError(f"{name} is a {img.distro} image: it pins no installer ISO",
                             "update-iso pins the installer ISO of AlmaLinux images")
        say(f"{name}: {pin.refresh(cfg.root, img)}")


@task
def update_flake(c: Context) -> None:
    """Run `nix flake update` in nixos/: nix (re)writes flake.lock, the nixpkgs pin; commit it.

    The lock is only ever written by nix, never by hand. It needs network access once.
    """
    from pipeline.distros.nixos import update_flake as refresh  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

    cfg = load_config(c)
    say(refresh(cfg.root))
