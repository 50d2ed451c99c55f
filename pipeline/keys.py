"""The project's SSH key: what builds and `invoke ssh` log in with when no key is configured."""

from __future__ import annotations

from pathlib import Path

from pipeline.base.errors import ConfigError, UnsafePath
from pipeline.base.fsutil import check_dir, ensure_dir
from pipeline.base.run import run

KEY_NAME = "imagepipe_ed25519"


def project_key(output_dir: Path, configured: str | None = None, *, create: bool = True) -> Path:
    """The private key to use: `defaults.ssh_key` if configured, else <output>/.keys/imagepipe_ed25519
    (created once with ssh-keygen; never committed, output/ is ignored). create=False (a dry
    run): the path it has or would have, nothing written.

    The key folder must be a real folder inside the output folder (a planted link is refused),
    and the key is written to a temp name first, then renamed into place."""
    if configured:
        path = Path(configured).expanduser()
        if not path.exists():
            raise ConfigError("invoke.yaml", [f"defaults.ssh_key: {path} does not exist"])
        return path
    key = output_dir / ".keys" / KEY_NAME
    if not create:
        return key
    check_dir(key.parent, output_dir)
    if key.is_symlink() and not key.exists():
        raise UnsafePath(f"{key} is a dangling symbolic link", f"move {key} away; a new key is then created")
    if not key.exists():
        ensure_dir(key.parent, output_dir, mode=0o700)
        tmp = key.with_name(KEY_NAME + ".tmp")
        for stale in (tmp, tmp.with_suffix(".tmp.pub")):
            stale.unlink(missing_ok=True)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "imagepipe", "-f", tmp])
        tmp.with_name(tmp.name + ".pub").replace(key.with_name(KEY_NAME + ".pub"))
        tmp.replace(key)
    return key


def public_key(private: Path) -> str:
    """The one-line public key next to `private` (or derived from it)."""
    pub = private.with_name(private.name + ".pub")
    if pub.exists():
        return pub.read_text(encoding="utf-8").strip()
    return run(["ssh-keygen", "-y", "-f", private]).stdout.strip()
