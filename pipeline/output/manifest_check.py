"""The shape of a manifest.json, checked before anything trusts it (local or a builder's).

A manifest names files imagepipe opens, boots and publishes, so a truncated, hand-edited or
hostile one must not reach that code: every field imagepipe reads is checked for its type and
shape (file names are plain names, never paths; hashes are 64 hex digits; sizes are whole
numbers), and all problems are reported at once. Fields imagepipe does not read pass through.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from pipeline.base.errors import CorruptState
from pipeline.base.text import has_control, visible

PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
IMAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
SHA256 = re.compile(r"[0-9a-f]{64}")
FORMATS = ("qcow2", "raw", "vmdk", "vhdx", "vdi")  # pipeline.model.Format
MAX_SIZE = 1 << 50  # 1 PiB: larger is not a disk image


def plain_name(value: Any) -> bool:
    """True for one plain path component (no '/', no '..', no leading '.' or '-')."""
    return isinstance(value, str) and PLAIN_NAME.fullmatch(value) is not None and ".." not in value


def _size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_SIZE


def problems(data: Any) -> list[str]:
    """What is wrong with a parsed manifest (empty: nothing)."""
    if not isinstance(data, Mapping):
        return [f"expected a JSON object, got {type(data).__name__}"]
    found = []
    checks: list[tuple[str, bool, str, Any]] = [
        ("image", isinstance(data.get("image"), str) and IMAGE_NAME.fullmatch(data["image"]) is not None,
         "an image name", data.get("image")),
        ("build_id", plain_name(data.get("build_id")), "a build id (one plain name)", data.get("build_id")),
    ]
    art = data.get("artifact")
    if not isinstance(art, Mapping):
        found.append(f"artifact: expected an object, got {_shown(art)}")
    else:
        checks += _file_checks("artifact", art)
    files = data.get("artifacts")  # every image file (one per format), the primary first
    if files is not None:
        if not isinstance(files, list) or not files:
            found.append(f"artifacts: expected a list of image files, got {_shown(files)}")
        else:
            for i, entry in enumerate(files):
                if not isinstance(entry, Mapping):
                    found.append(f"artifacts[{i}]: expected an object, got {_shown(entry)}")
                else:
                    checks += _file_checks(f"artifacts[{i}]", entry)
    if data.get("input_hash") is not None:
        checks.append(("input_hash", isinstance(data["input_hash"], str) and SHA256.fullmatch(data["input_hash"])
                       is not None, "64 hex digits", data["input_hash"]))
    boot = data.get("boot")
    if boot is not None:
        if not isinstance(boot, Mapping):
            found.append(f"boot: expected an object, got {_shown(boot)}")
        else:
            checks += [
                ("boot.kernel", plain_name(boot.get("kernel")), "a plain file name", boot.get("kernel")),
                ("boot.initrd", plain_name(boot.get("initrd")), "a plain file name", boot.get("initrd")),
                ("boot.append", isinstance(boot.get("append", ""), str) and not has_control(boot.get("append", "")),
                 "a kernel command line on one line", boot.get("append")),
            ]
    checks += _optional_checks(data)
    for key, ok, expected, value in checks:
        if not ok:
            found.append(f"{key}: expected {expected}, got {_shown(value)}")
    return found


def _file_checks(key: str, art: Mapping[str, Any]) -> list[tuple[str, bool, str, Any]]:
    """The checks of one image file's record (artifact, or an entry of artifacts)."""
    checks: list[tuple[str, bool, str, Any]] = [
        (f"{key}.file", plain_name(art.get("file")), "a plain file name", art.get("file")),
        (f"{key}.format", art.get("format") in FORMATS, f"one of {', '.join(FORMATS)}", art.get("format")),
        (f"{key}.size", _size(art.get("size")), "a size in bytes", art.get("size")),
        (f"{key}.sha256", isinstance(art.get("sha256"), str) and SHA256.fullmatch(art["sha256"]) is not None,
         "64 hex digits", art.get("sha256")),
    ]
    if "virtual_size" in art:
        checks.append((f"{key}.virtual_size", _size(art.get("virtual_size")), "a size in bytes",
                       art.get("virtual_size")))
    if "compressed" in art:
        checks.append((f"{key}.compressed", isinstance(art.get("compressed"), bool), "true or false",
                       art.get("compressed")))
    return checks



def _strings(value: Any) -> bool:
    """An object whose values are all text or null (host, tools, input_parts, accelerator)."""
    return isinstance(value, Mapping) and all(isinstance(k, str) and (v is None or isinstance(v, str))
                                              for k, v in value.items())


def _sums(value: Any) -> bool:
    """{plain file name: 64 hex digits} (files)."""
    return isinstance(value, Mapping) and all(plain_name(k) and isinstance(v, str) and SHA256.fullmatch(v) is not None
                                              for k, v in value.items())


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0


# Fields read by a fetch, the history, gc, diff and the summary: when present, of this shape
# (a builder's manifest that has one of another type is refused here, not deep inside that code).
OPTIONAL: dict[str, tuple[Any, str]] = {
    "arch": (lambda v: isinstance(v, str), "text"),
    "distro": (lambda v: isinstance(v, str), "text"),
    "version": (lambda v: isinstance(v, str), "text"),
    "imagepipe": (lambda v: isinstance(v, str), "text"),
    "started": (lambda v: isinstance(v, str), "a time stamp"),
    "finished": (lambda v: isinstance(v, str), "a time stamp"),
    "duration_s": (_number, "a number of seconds"),
    "sbom": (plain_name, "a plain file name"),
    "host": (_strings, "an object of text values"),
    "tools": (_strings, "an object of text values"),
    "input_parts": (_strings, "an object of text values"),
    "accelerator": (_strings, "an object of text values"),
    "files": (_sums, "an object of file name: sha256"),
    "blake3": (_sums, "an object of file name: BLAKE3 (64 hex digits)"),
    "packages": (lambda v: isinstance(v, list) and all(isinstance(p, Mapping) for p in v), "a list of objects"),
}


def _optional_checks(data: Mapping[str, Any]) -> list[tuple[str, bool, str, Any]]:
    return [(key, ok(data[key]), expected, data[key]) for key, (ok, expected) in OPTIONAL.items()
            if data.get(key) is not None]


def _shown(value: Any) -> str:
    text = visible(repr(value))
    return text if len(text) <= 60 else text[:57] + "..."


def check(data: Any, source: str, hint: str | None = None) -> dict[str, Any]:
    """`data` when it is a usable manifest, else CorruptState listing every problem."""
    found = problems(data)
    if found:
        raise CorruptState(f"{source} is not a usable manifest: " + "; ".join(found),
                           hint or "rebuild the image (invoke build IMAGE), or move the damaged build away")
    return dict(data)


def parse(text: str, source: str, hint: str | None = None) -> dict[str, Any]:
    """manifest.json text → a checked manifest (CorruptState for bad JSON or a bad shape)."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise CorruptState(f"{source} is not valid JSON ({visible(str(exc))[:120]})",
                           hint or "rebuild the image (invoke build IMAGE), or move the damaged build away") from None
    return check(data, source, hint)
