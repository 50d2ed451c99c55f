"""The boot-test gate in a real build: a build whose boot test fails is not published."""

import os

import pytest
import yaml

from pipeline.base.errors import VerifyFailed
from pipeline.build import BuildOptions, build_image
from pipeline.config import load
from pipeline.output import artifacts
from pipeline.progress import Progress
from tests.support import ROOT, keygen, published_copy

pytestmark = pytest.mark.slow


class SwapKeyAtBootTest(Progress):
    """The build's own progress view, which replaces the login key when the boot-test step is
    announced: Packer has finished with the old key by then, so the new image holds a key the
    boot test no longer has, and the real guest's sshd refuses the login."""

    def __init__(self, image: str, key: os.PathLike[str], stranger: os.PathLike[str]) -> None:
        super().__init__(image, live=False)
        self.key, self.stranger = key, stranger
        self.steps_seen: list[str] = []

    def step_event(self, message: str) -> None:
        self.steps_seen.append(message)
        if message == "boot test":
            for suffix in ("", ".pub"):
                os.replace(f"{self.stranger}{suffix}", f"{self.key}{suffix}")
        super().step_event(message)


def test_failing_boot_test_leaves_the_last_good_image_published(demo_build, tmp_path):
    _, out = published_copy(demo_build, tmp_path, cache=True)
    raw = yaml.safe_load((ROOT / "invoke.yaml").read_text())
    raw["defaults"]["output_dir"] = str(out)
    # the demo's sshd answers within seconds; a short deadline makes the refused login fail in
    # 30 s instead of the 12 minutes a full OS gets under TCG
    raw["defaults"]["boot_timeout"] = 30
    cfg = load(raw, ROOT)
    image_dir = out / "demo-x86_64"
    before = os.readlink(image_dir / "current")
    key = out / ".keys" / "imagepipe_ed25519"  # the project key the demo build logs in with
    assert key.is_file()
    stranger = tmp_path / "stranger_ed25519"
    keygen(stranger)
    progress = SwapKeyAtBootTest("demo-x86_64", key, stranger)

    with pytest.raises(VerifyFailed) as exc:
        build_image(cfg, cfg.image("demo-x86_64"), BuildOptions(boot_test=True), progress=progress,
                    say=lambda line: None)
    assert "boot test" in progress.steps_seen and "publish" not in progress.steps_seen
    text = exc.value.render()
    assert f"cannot log in as root with {key}" in text and "console log (last lines)" in text, text
    assert os.readlink(image_dir / "current") == before
    assert artifacts.verify_published(image_dir)
    assert not list(image_dir.glob(".staging/*"))
