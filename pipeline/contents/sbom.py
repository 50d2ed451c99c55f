"""A CycloneDX 1.6 JSON SBOM of one image build: the subset of the spec imagepipe needs.

    bomFormat, specVersion, serialNumber (urn:uuid, derived from image + build id), version,
    metadata: timestamp, tools (imagepipe), component (the image: type operating-system, the
              primary disk file's SHA-256, build id and input hash as properties),
    components: one `library` per package (name, version, purl, nix store path as a property),
    dependencies: the image depends on every package.

Written as plain JSON (no library on the CLI path); the test suite validates it against the
official CycloneDX JSON schema (shipped by cyclonedx-python-lib, a test dependency).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from pipeline import __version__
from pipeline.contents.packages import Package

SPEC_VERSION = "1.6"
FILE_NAME = "sbom.cdx.json"   # beside the image in every build (CycloneDX's *.cdx.json naming)
IMAGE_REF = "image"
NAMESPACE = uuid.UUID("5b6e0f43-3a0c-4e55-9a39-1d9f2b6a7c10")  # imagepipe's, for uuid5 serial numbers


def serial_number(image: str, build_id: str) -> str:
    """urn:uuid:... unique per build and the same when the same build is described again."""
    return f"urn:uuid:{uuid.uuid5(NAMESPACE, f'{image}/{build_id}')}"


def component(p: Package, ref: str) -> dict[str, Any]:
    """One package as a CycloneDX component."""
    comp: dict[str, Any] = {"type": "library", "bom-ref": ref, "name": p.name}
    if p.full_version:
        comp["version"] = p.full_version
    comp["purl"] = p.purl
    props = [{"name": "imagepipe:package:type", "value": p.kind}]
    if p.path:
        props.append({"name": "nix:store_path", "value": p.path})
    comp["properties"] = props
    return comp


def _refs(packages: list[Package]) -> list[str]:
    """A unique bom-ref per package: its purl (store path for nix), numbered when repeated."""
    seen: dict[str, int] = {}
    refs = []
    for p in packages:
        base = p.path or p.purl
        seen[base] = seen.get(base, 0) + 1
        refs.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
    return refs


def document(manifest: Mapping[str, Any], packages: Iterable[Package]) -> dict[str, Any]:
    """The SBOM of the build `manifest` describes (pure)."""
    pkgs = sorted(packages)
    refs = _refs(pkgs)
    art = manifest["artifact"]
    image: dict[str, Any] = {
        "type": "operating-system",
        "bom-ref": IMAGE_REF,
        "name": manifest["image"],
        "version": str(manifest.get("version") or "unknown"),
        "description": f"{manifest.get('distro', '')} {manifest.get('arch', '')} VM disk image {art['file']}".strip(),
        "hashes": [{"alg": "SHA-256", "content": art["sha256"]}],
        "properties": [
            {"name": "imagepipe:build_id", "value": str(manifest["build_id"])},
            {"name": "imagepipe:input_hash", "value": str(manifest.get("input_hash", ""))},
            {"name": "imagepipe:format", "value": str(art.get("format", ""))},
        ],
    }
    return {
        "bomFormat": "CycloneDX",
        "specVersion": SPEC_VERSION,
        "serialNumber": serial_number(manifest["image"], manifest["build_id"]),
        "version": 1,
        "metadata": {
            "timestamp": manifest["finished"],
            "tools": {"components": [{"type": "application", "name": "imagepipe", "version": __version__}]},
            "component": image,
        },
        "components": [component(p, ref) for p, ref in zip(pkgs, refs, strict=True)],
        "dependencies": [{"ref": IMAGE_REF, "dependsOn": refs}] + [{"ref": r} for r in refs],
    }


def dumps(doc: Mapping[str, Any]) -> str:
    return json.dumps(doc, indent=2, sort_keys=False) + "\n"
