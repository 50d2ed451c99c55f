"""The project's SSH key: what builds and `invoke ssh` log in with when no key is configured."""

from __future__ import annotations

from pathlib import Path

from pipeline.run import run

KEY_NAME = "imagepipe_ed25519"


def project_key(output_dir: Path, configured: str | None = None) -> Path:
    """The private key to use: `defaults.ssh_key` if configured, else <output>/.keys/imagepipe_ed25519
    (created once with ssh-keygen; never committed, output/ is ignored)."""
    if configured:
        path = Path(configured).expanduser()
        if not path.exists():
            from pipeline.errors import ConfigError

            raise ConfigError("invoke.yaml", [f"defaults.ssh_key: {path} does not exist"])
        return path
    key = output_dir / ".keys" / KEY_NAME
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
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
