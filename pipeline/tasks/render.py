"""Generated files: `invoke render` (templates, kickstarts) and `invoke update-iso` (ISO pins)."""

from __future__ import annotations

from invoke import Context

from pipeline.tasks.common import load_config, say, task


@task(help={"image": "render only this image (default: every image)"})
def render(c: Context, image: str | None = None) -> None:
    """Write the committed Packer templates and kickstarts from invoke.yaml (only what changed)."""
    from pipeline.render.files import rendered_files, write_all

    cfg = load_config(c)  # every config problem is reported before anything is written
    files = rendered_files(cfg, [image] if image else None)
    written = write_all(files)
    for path in written:
        say(f"wrote {path.relative_to(cfg.root)}")
    say(f"{len(written)} of {len(files)} generated files changed" if written else f"all {len(files)} generated files up to date")


@task(help={"image": "pin only this AlmaLinux image (default: all of them)"})
def update_iso(c: Context, image: str | None = None) -> None:
    """Resolve AlmaLinux versions to point releases and pin URL + sha256 in iso.lock.json."""
    from pipeline import iso
    from pipeline.config import Distro
    from pipeline.errors import UsageError

    cfg = load_config(c)
    names = [image] if image else sorted(n for n, i in cfg.images.items() if i.distro is Distro.ALMALINUX)
    mirrors = iso.Mirrors.from_env()
    entries = iso.read_lock(cfg.root)
    for name in names:
        img = cfg.image(name)
        if img.distro is not Distro.ALMALINUX:
            raise UsageError(f"{name} is a {img.distro.value} image: only AlmaLinux images use an installer ISO")
        entry = iso.resolve(img, mirrors)
        before = entries.get(name)
        entries[name] = entry
        change = "unchanged" if before == entry else f"was {before.version}" if before else "new"
        say(f"{name}: {img.version} -> {entry.version} ({entry.source}) sha256 {entry.sha256[:16]}... [{change}]")
    changed = iso.write_lock(cfg.root, entries)
    say(f"{'wrote' if changed else 'unchanged:'} {iso.LOCK_FILE}")
