"""OpenPGP clear-signed text verified with gpgv (GnuPG's verify-only tool) against one public
key file: the text the signature covers (never what was put around it), or BadSignature saying
why not (a changed file, another key's signature, none at all)."""

from __future__ import annotations

import base64
import shutil
import tempfile
from pathlib import Path

from pipeline.base.errors import ImagepipeError
from pipeline.base.run import run

SIGNED_HEADER = "-----BEGIN PGP SIGNED MESSAGE-----"


class BadSignature(ImagepipeError):
    """Signed text whose signature does not verify: it is not used."""

    exit_code = 1


def gpgv() -> str | None:
    """gpgv's path (None: not installed, nothing can be verified)."""
    return shutil.which("gpgv")


def dearmor(data: bytes) -> bytes:
    """An ASCII-armored OpenPGP block → its binary packets (binary input is returned as it is);
    gpgv wants a binary keyring."""
    text = data.decode("ascii", errors="replace")
    if "-----BEGIN PGP" not in text:
        return data
    body = text.split("-----BEGIN PGP", 1)[1].split("\n", 1)[1].split("-----END PGP", 1)[0]
    lines = body.strip().splitlines()
    if "" in lines:  # armor headers (Version: …) end with an empty line
        lines = lines[lines.index("") + 1:]
    return base64.b64decode("".join(line.strip() for line in lines if not line.startswith("=")))


def verify_clearsigned(text: str, key_file: Path, fingerprint: str | None, *, what: str, key_label: str,
                       hint: str) -> str:
    """The signed text of `text` when gpgv verifies it with `key_file` (and the signer's primary
    key has `fingerprint`, when one is pinned); BadSignature otherwise. gpgv must be installed."""
    tool = gpgv()
    if tool is None:
        raise BadSignature(f"cannot check the signature of {what}: gpgv not found", hint)
    if SIGNED_HEADER not in text:
        raise BadSignature(f"{what} is not signed", hint)
    try:
        key_bytes = dearmor(key_file.read_bytes())
    except (OSError, ValueError) as exc:
        raise BadSignature(f"cannot read the key {key_file} ({exc})", hint) from None
    with tempfile.TemporaryDirectory(prefix="imagepipe-gpgv-") as tmp:
        keyring, signed, out = Path(tmp) / "key.gpg", Path(tmp) / "signed.txt", Path(tmp) / "out.txt"
        keyring.write_bytes(key_bytes)
        signed.write_text(text, encoding="utf-8")
        res = run([tool, "--homedir", tmp, "--keyring", str(keyring), "--status-fd", "1", "--output", str(out),
                   str(signed)], check=False, timeout=60, env={"LC_ALL": "C"})
        made_by = valid_signer(res.stdout)
        if not res.ok or made_by is None:
            raise BadSignature(f"{what}: {bad_reason(res.stdout) or 'the signature does not verify'} "
                               f"with {key_label}", hint)
        if fingerprint is not None and made_by != fingerprint.upper():
            raise BadSignature(f"{what} is signed by {made_by}, not by {key_label}", hint)
        return out.read_text(encoding="utf-8", errors="replace")


def valid_signer(status: str) -> str | None:
    """The primary key fingerprint of a good signature in gpgv's --status-fd output."""
    for line in status.splitlines():
        fields = line.split()
        if fields[:2] == ["[GNUPG:]", "VALIDSIG"] and len(fields) >= 3:
            return (fields[11] if len(fields) > 11 else fields[2]).upper()
    return None


def bad_reason(status: str) -> str | None:
    """Why gpgv refused, the most telling status first (gpgv reports ERRSIG beside NO_PUBKEY)."""
    seen = {line.split()[1] for line in status.splitlines() if line.startswith("[GNUPG:] ") and len(line.split()) > 1}
    for word, why in (("BADSIG", "the signature is BAD (the file was changed after it was signed)"),
                      ("NO_PUBKEY", "it is signed by another key"),
                      ("ERRSIG", "the signature cannot be checked")):
        if word in seen:
            return why
    return None
