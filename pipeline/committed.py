"""The committed, generated files: what each image's profile renders, written only where it changed.

Each image contributes what its distro profile renders (`Profile.rendered_files`): a Packer
template under packer/<family>/<arch>/, AlmaLinux's kickstart, NixOS's params JSON. This is the
module that asks the profiles, so that render/ stays a leaf that knows no distro.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from pipeline import distros
from pipeline.base.errors import ConfigError
from pipeline.base.fsutil import write_if_changed
from pipeline.model import Config, Image


def image_files(image: Image, root: Path, source: str = "invoke.yaml") -> dict[Path, str]:
    """path -> content of every generated file `image` owns (empty when nothing is rendered)."""
    return distros.profile(image).rendered_files(image, root, source)


def rendered_files(cfg: Config, names: Iterable[str] | None = None) -> dict[Path, str]:
    """Everything the configuration renders (all images, or `names`), before anything is written.

    Two images claiming one path with different content is an error: nothing gets written.
    """
    images = [cfg.image(n) for n in names] if names else [cfg.images[k] for k in sorted(cfg.images)]
    out: dict[Path, str] = {}
    owner: dict[Path, str] = {}
    for image in images:
        for path, text in image_files(image, cfg.root, cfg.source).items():
            if path in out and out[path] != text:
                raise ConfigError(cfg.source, [f"images.{image.name}: renders {path}, which {owner[path]} renders differently"])
            out[path], owner[path] = text, image.name
    return out


def write_all(files: Mapping[Path, str]) -> list[Path]:
    """Write every file whose content changed; the paths written, in order."""
    return [path for path in sorted(files) if write_if_changed(path, files[path])]


def drift(files: Mapping[Path, str]) -> list[Path]:
    """Committed files that differ from (or are missing against) what the config renders."""
    stale = []
    for path in sorted(files):
        try:
            if path.read_text(encoding="utf-8") != files[path]:
                stale.append(path)
        except FileNotFoundError:
            stale.append(path)
    return stale


def render_text(image: Image, legacy: bool = False) -> str:
    """The Packer template text of a Packer-built image (legacy=False is what gets committed)."""
    text = distros.profile(image).driver.template_text(image, legacy)
    if text is None:
        raise TypeError(f"{image.name} ({image.distro}) is not built from a rendered template")
    return text
