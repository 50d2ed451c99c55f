"""The per-image task names come from invoke.yaml's images by one rule (pipeline.tasks.aliases):
every name the docs promise, and the same rule for an image the project has never seen."""

from __future__ import annotations

from pathlib import Path

import yaml

from pipeline.tasks import collection
from tests.support import ROOT

# Each per-image name the project has offered, with the task and image it runs.
PROMISED = {
    "build-demo": ("build", "demo-x86_64"), "build-alma-x86": ("build", "almalinux10-x86_64"),
    "build-alma-arm": ("build", "almalinux10-aarch64"), "build-nixos-x86": ("build", "nixos-x86_64"),
    "build-nixos-arm": ("build", "nixos-aarch64"),
    "run-demo": ("run", "demo-x86_64"), "run-alma-x86": ("run", "almalinux10-x86_64"),
    "run-alma-arm": ("run", "almalinux10-aarch64"), "run-nixos-x86": ("run", "nixos-x86_64"),
    "run-nixos-arm": ("run", "nixos-aarch64"),
    "ssh-demo": ("ssh", "demo-x86_64"), "ssh-alma": ("ssh", "almalinux10-x86_64"), "ssh-nixos": ("ssh", "nixos-x86_64"),
    "remote-fetch-demo": ("remote-fetch", "demo-x86_64"), "remote-fetch-x86": ("remote-fetch", "almalinux10-x86_64"),
    "remote-fetch-arm": ("remote-fetch", "almalinux10-aarch64"),
    "remote-fetch-nixos-x86": ("remote-fetch", "nixos-x86_64"), "remote-fetch-nixos-arm": ("remote-fetch", "nixos-aarch64"),
}


def _runs(root: Path) -> dict[str, tuple[str, str]]:
    """Every name a per-image task answers to (its own and its second names) -> (task, image)."""
    coll = collection(root)
    out = {}
    for name, second in coll.task_names.items():
        made = coll.tasks[name]
        target = getattr(made, "alias_of", None)
        if target is not None:
            for each in (name, *second):  # ssh's names fix its instance: the one named after the image
                out[each] = (target[0], target[1].get("image") or target[1]["instance"])
    return out


def _project(tmp_path: Path, images: dict[str, dict[str, str]]) -> Path:
    (tmp_path / "invoke.yaml").write_text(yaml.safe_dump({"images": images}, sort_keys=False))
    return tmp_path


def test_every_promised_name_runs_its_image() -> None:
    runs = _runs(ROOT)
    assert {name: runs.get(name) for name in PROMISED} == PROMISED


def test_a_new_distro_gets_its_names_by_the_same_rule(tmp_path: Path) -> None:
    root = _project(tmp_path, {"debian13-x86_64": {"distro": "debian", "arch": "x86_64"},
                               "debian13-aarch64": {"distro": "debian", "arch": "aarch64"}})
    runs = _runs(root)
    assert runs["build-debian-x86"] == ("build", "debian13-x86_64")
    assert runs["run-debian-x86"] == ("run", "debian13-x86_64")
    assert runs["ssh-debian-x86"] == runs["ssh-debian"] == ("ssh", "debian13-x86_64")
    assert runs["remote-fetch-debian-arm"] == ("remote-fetch", "debian13-aarch64")


def test_a_name_two_images_would_share_goes_to_the_first(tmp_path: Path) -> None:
    root = _project(tmp_path, {"almalinux10-x86_64": {"distro": "almalinux", "arch": "x86_64"},
                               "almalinux9-x86_64": {"distro": "almalinux", "arch": "x86_64"}})
    runs = _runs(root)
    assert runs["build-alma-x86"] == ("build", "almalinux10-x86_64")
    assert "almalinux9-x86_64" not in {image for _task, image in runs.values()}


def test_an_unreadable_invoke_yaml_gives_no_per_image_tasks(tmp_path: Path) -> None:
    (tmp_path / "invoke.yaml").write_text("images: [unclosed\n")
    coll = collection(tmp_path)
    assert _runs(tmp_path) == {} and "build" in coll.tasks
