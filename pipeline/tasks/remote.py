"""Remote builder tasks: sync + build over SSH, parallel builds, fetch + verify + publish here."""

from __future__ import annotations

from invoke import Context, Exit

from pipeline.tasks.common import load_config, say, task
from pipeline.tasks.options import REMOTE_ACCEL_HELP, accel_option, remote_accel_option

HOST_HELP = "builder: a name under `builders:` in invoke.yaml, or an SSH host alias from your ssh config"
ACCEPT_HELP = "trust the builder's host key if it is not known yet and add it to known_hosts (a changed key is always refused)"


def _target(c: Context, host: str):  # type: ignore[no-untyped-def]
    """Config + validated builder, before any connection."""
    from pipeline.builders import remote  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

    cfg = load_config(c)
    return cfg, remote.resolve(cfg, host, remote.ssh_config_path(c.config))


@task(help={"host": HOST_HELP, "image": "image to build there (default: almalinux10-x86_64)",
            "accel": REMOTE_ACCEL_HELP, "accept_new_host_key": ACCEPT_HELP})
def remote_sync_build(c: Context, host: str, image: str = "almalinux10-x86_64", accel: str = "",
                      accept_new_host_key: bool = False) -> None:
    """Sync the project to a builder and build an image there (streamed, exits with its status).

    The build there also authorizes this machine's project key, so the fetched image logs in
    here. Ctrl-C stops the remote build cleanly (docs/remote-builders.md#building-on-a-builder).
    """
    from pipeline.builders import dispatch  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

    cfg, target = _target(c, host)
    cfg.image(image)
    rows = dispatch.sync_and_build(cfg, target, [image], remote_accel_option(accel), accept_new_host_key, say)
    if rows[0].exit_code != 0:
        raise Exit(f"{image} on {target.name}: {rows[0].status} (exit {rows[0].exit_code})",
                   code=rows[0].exit_code)


NIXOS_REMOTE_HELP = {
    "host": HOST_HELP, "accel": REMOTE_ACCEL_HELP, "accept_new_host_key": ACCEPT_HELP,
    "sync": "take the project-sync route even when nix is installed here (rsync the project, build with the "
            "builder's own imagepipe, publish there; fetch with remote-fetch-nixos-*)",
}


def _remote_nixos(c: Context, host: str, image: str, accel: str, accept_new_host_key: bool, sync: bool) -> None:
    """nix installed here: nix's remote build over ssh-ng (evaluated here, built there, published
    here). Else, or with --sync: the project-sync route."""
    import shutil  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

    cfg, target = _target(c, host)
    img = cfg.image(image)
    if sync or shutil.which("nix") is None:
        why = "--sync" if sync else "nix is not installed here"
        say(f"{target.prefix}project-sync route ({why}): the project is synced and {image} is built and "
            f"published on {target.name}; fetch it with invoke remote-fetch {target.name} {image}")
        remote_sync_build.body(c, host, image=image, accel=accel, accept_new_host_key=accept_new_host_key)
        return
    from pipeline.build import BuildOptions, build_image  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

    say(f"{target.prefix}ssh-ng route (nix is installed here): nix evaluates {image} here against the local "
        f"flake.lock, builds it in {target.name}'s store, and the image is copied back and published here")
    opts = BuildOptions(accel=accel_option(accel, cfg), builder=target, accept_new_host_key=accept_new_host_key)
    build_image(cfg, img, opts, say=say)


@task(help=NIXOS_REMOTE_HELP)
def remote_build_nixos_x86(c: Context, host: str, accel: str = "", accept_new_host_key: bool = False,
                           sync: bool = False) -> None:
    """Build NixOS x86_64 on a builder (nix over ssh-ng if nix is here, else project sync).

    The route is said at the start. With nix here: `build nixos-x86_64 --builder HOST`,
    evaluated here, built in HOST's store, published here. Without nix here, or with --sync:
    as remote-sync-build, published on HOST; remote-fetch-nixos-x86 brings it
    (docs/images.md#nixos-on-other-machines-nixs-remote-builds).
    """
    _remote_nixos(c, host, "nixos-x86_64", accel, accept_new_host_key, sync)


@task(help=NIXOS_REMOTE_HELP)
def remote_build_nixos_arm(c: Context, host: str, accel: str = "", accept_new_host_key: bool = False,
                           sync: bool = False) -> None:
    """Build NixOS aarch64 on a builder (nix over ssh-ng if nix is here, else project sync).

    As remote-build-nixos-x86, for nixos-aarch64.
    """
    _remote_nixos(c, host, "nixos-aarch64", accel, accept_new_host_key, sync)


@task(iterable=["image"], help={
    "host": "builder for every image (default: spread the images over the configured builders by arch)",
    "image": "an image to build (repeat for several; default: every configured image)",
    "accel": REMOTE_ACCEL_HELP, "accept_new_host_key": ACCEPT_HELP})
def remote_build(c: Context, host: str = "", image: list[str] | None = None, accel: str = "",
                 accept_new_host_key: bool = False) -> None:
    """Build several images on builders in parallel (per-builder output, then a summary table)."""
    from pipeline.builders import dispatch, remote  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

    cfg = load_config(c)
    images = [cfg.image(n) for n in (image or sorted(cfg.images))]
    ssh_config = remote.ssh_config_path(c.config)
    plan = dispatch.assign(images, cfg.builders, host)
    targets = {name: remote.resolve(cfg, name, ssh_config) for name in plan}
    for name, names in plan.items():
        say(f"{targets[name].prefix}will build: {', '.join(names)}")
    rows = dispatch.run_parallel(cfg, plan, targets, remote_accel_option(accel), accept_new_host_key, say)
    print(dispatch.summary(rows))
    failed = [r for r in rows if r.exit_code != 0]
    if failed:
        raise Exit(f"{len(failed)} of {len(rows)} remote builds did not succeed", code=failed[0].exit_code)


@task(help={"host": HOST_HELP, "image": "image to fetch (published on the builder)",
            "accept_new_host_key": ACCEPT_HELP})
def remote_fetch(c: Context, host: str, image: str, accept_new_host_key: bool = False) -> None:
    """Fetch a builder's published image: rsync (resumable), verify sha256, publish in output/.

    Every file of the build arrives with its sha256 checked; the fetch holds the image's lock,
    is skipped when the build is already here, and keeps the local image on any mismatch
    (docs/remote-builders.md#fetching-a-build).
    """
    from pipeline import fetch  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

    cfg, target = _target(c, host)
    img = cfg.image(image)
    # no Fabric connection: the fetch opens one OpenSSH connection for the manifest and rsync
    fetch.fetch(None, target, cfg, img, say, accept_new_host_key=accept_new_host_key)

