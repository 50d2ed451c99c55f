"""What changed between two builds of an image, from their manifests: packages added, removed and
changed (old → new version), the input-hash parts that changed (template, kickstart, ISO pin,
flake.lock, config, tool versions), and the size of every image file.

`invoke diff IMAGE` compares the last two builds kept under output/<image>/builds/; the rebuild
report carries `summary()` of the published build against the one before. Comparing is pure:
two manifests in, a `Diff` out.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.base.errors import UsageError
from pipeline.contents.packages import from_manifest
from pipeline.output import artifacts


@dataclass(frozen=True)
class Change:
    """One package whose version differs (versions joined with ", " when a name occurs twice)."""

    name: str
    old: str
    new: str


@dataclass(frozen=True)
class Diff:
    image: str
    old: str                       # build ids
    new: str
    added: list[tuple[str, str]] = field(default_factory=list)       # (package, version)
    removed: list[tuple[str, str]] = field(default_factory=list)
    changed: list[Change] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)                   # input-hash parts that differ
    sizes: dict[str, tuple[int | None, int | None]] = field(default_factory=dict)  # format → (old, new)
    same_image: bool = False       # the primary image files are bit-for-bit the same
    notes: list[str] = field(default_factory=list)

    @property
    def unchanged(self) -> bool:
        return not (self.added or self.removed or self.changed or self.inputs) and self.same_image

    def as_json(self) -> dict[str, Any]:
        return {
            "image": self.image, "old": self.old, "new": self.new,
            "packages": {
                "added": [{"name": n, "version": v} for n, v in self.added],
                "removed": [{"name": n, "version": v} for n, v in self.removed],
                "changed": [{"name": c.name, "old": c.old, "new": c.new} for c in self.changed],
            },
            "inputs_changed": self.inputs,
            "sizes": {fmt: {"old": a, "new": b, "change": (b - a) if a is not None and b is not None else None}
                      for fmt, (a, b) in self.sizes.items()},
            "same_image": self.same_image,
            "notes": self.notes,
        }


def _versions(manifest: Mapping[str, Any]) -> dict[str, list[str]] | None:
    """package key → its versions (sorted), or None when the manifest has no package list."""
    records = manifest.get("packages")
    if not isinstance(records, list):
        return None
    out: dict[str, list[str]] = defaultdict(list)
    for p in from_manifest(records):
        out[p.key].append(p.full_version)
    return {k: sorted(v) for k, v in out.items()}


def _sizes(manifest: Mapping[str, Any]) -> dict[str, int]:
    return {str(a.get("format", "?")): int(a.get("size", 0)) for a in artifacts.image_files(dict(manifest))}


def compare(old: Mapping[str, Any], new: Mapping[str, Any]) -> Diff:
    """The difference between two manifests of the same image (pure)."""
    d = Diff(str(new.get("image", old.get("image", "?"))), str(old.get("build_id", "?")),
             str(new.get("build_id", "?")),
             same_image=old.get("artifact", {}).get("sha256") == new.get("artifact", {}).get("sha256"))
    before, after = _versions(old), _versions(new)
    if before is None or after is None:
        which = [str(m.get("build_id", "?")) for m in (old, new) if _versions(m) is None]
        d.notes.append(f"no package list in build {', '.join(which)} (built before imagepipe recorded one)")
    else:
        d.added.extend((key, ", ".join(after[key])) for key in sorted(after.keys() - before.keys()))
        d.removed.extend((key, ", ".join(before[key])) for key in sorted(before.keys() - after.keys()))
        d.changed.extend(Change(key, ", ".join(before[key]), ", ".join(after[key]))
                         for key in sorted(before.keys() & after.keys()) if before[key] != after[key])
    parts_a, parts_b = old.get("input_parts") or {}, new.get("input_parts") or {}
    d.inputs.extend(sorted(k for k in parts_a.keys() | parts_b.keys() if parts_a.get(k) != parts_b.get(k)))
    sa, sb = _sizes(old), _sizes(new)
    for fmt in [*sb, *(f for f in sa if f not in sb)]:  # the new build's formats first, primary first
        d.sizes[fmt] = (sa.get(fmt), sb.get(fmt))
    return d


# --------------------------------------------------------------------------------- which builds


def kept_builds(image_dir: Path) -> list[tuple[str, dict[str, Any]]]:
    """(build id, manifest) of every kept build, oldest first (ids sort by time)."""
    builds = image_dir / "builds"
    out = []
    for folder in sorted(builds.iterdir()) if builds.is_dir() else []:
        path = folder / artifacts.MANIFEST
        if folder.is_dir() and not folder.is_symlink() and path.is_file():
            try:
                out.append((folder.name, json.loads(path.read_text(encoding="utf-8"))))
            except ValueError:
                continue
    return out


def pick(image_dir: Path, image: str, old: str = "", new: str = "") -> tuple[dict[str, Any], dict[str, Any]]:
    """The two manifests to compare: the named builds; one named → that one against the published
    build; none → the last two builds kept."""
    kept = dict(kept_builds(image_dir))
    ids = sorted(kept)
    for name in (old, new):
        if name and name not in kept:
            raise UsageError(f"{image} has no kept build {name!r}",
                             "kept builds: " + (", ".join(ids) if ids else "none (build it first)"))
    if old and new:
        return kept[old], kept[new]
    if old:
        current = artifacts.current_build(image_dir)
        if current is None or current.name not in kept:
            raise UsageError(f"{image} has no published build to compare {old} with")
        return kept[old], kept[current.name]
    if len(ids) < 2:
        raise UsageError(f"{image} has {len(ids)} kept build(s): a comparison needs two",
                         f"build it again (invoke build {image} --force), or raise images.{image}.retention")
    return kept[ids[-2]], kept[ids[-1]]


# --------------------------------------------------------------------------------- for people


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / (1 << 20):.1f} MiB"


def signed_mib(n: int) -> str:
    return f"{'+' if n >= 0 else '-'}{abs(n) / (1 << 20):.1f} MiB"


def render(d: Diff) -> str:
    """The comparison as text for people."""
    lines = [f"{d.image}: build {d.old} → {d.new}"]
    counts = f"{len(d.added)} added, {len(d.removed)} removed, {len(d.changed)} changed"
    lines.append(f"  packages: {counts}")
    lines += [f"    + {n} {v}" for n, v in d.added]
    lines += [f"    - {n} {v}" for n, v in d.removed]
    lines += [f"    ~ {c.name} {c.old} → {c.new}" for c in d.changed]
    lines.append("  inputs changed: " + (", ".join(d.inputs) if d.inputs else "none"))
    for fmt, (a, b) in d.sizes.items():
        change = f" ({signed_mib(b - a)})" if a is not None and b is not None else ""
        lines.append(f"  size {fmt}: {mib(a)} → {mib(b)}{change}")
    lines.append("  image: " + ("bit-for-bit the same" if d.same_image else "differs"))
    lines += [f"  note: {n}" for n in d.notes]
    return "\n".join(lines)


def summary(d: Diff) -> dict[str, Any]:
    """The short form the rebuild report carries: counts, changed inputs, primary size change."""
    sizes = list(d.sizes.values())
    a, b = sizes[0] if sizes else (None, None)
    return {
        "from": d.old,
        "packages": {"added": len(d.added), "removed": len(d.removed), "changed": len(d.changed)},
        "changed": [f"{c.name} {c.old} → {c.new}" for c in d.changed[:20]],
        "inputs_changed": d.inputs,
        "size_change": (b - a) if a is not None and b is not None else None,
        "same_image": d.same_image,
    }


def summary_line(s: Mapping[str, Any]) -> str:
    """One line of `summary()` for the text rebuild report."""
    p = s["packages"]
    size = f", size {signed_mib(s['size_change'])}" if s.get("size_change") is not None else ""
    inputs = ", ".join(s["inputs_changed"]) or "none"
    return (f"since {s['from']}: packages +{p['added']} -{p['removed']} ~{p['changed']}; inputs changed: {inputs}"
            f"{size}{'; same image' if s.get('same_image') else ''}")
