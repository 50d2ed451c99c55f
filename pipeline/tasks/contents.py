"""What is inside the builds: `invoke diff` (between two builds) and `invoke check-reproducible`.

Both take the image as their one positional argument. Invoke has no optional positional
arguments, so the builds `diff` compares are the options --build-a / --build-b.
"""

from __future__ import annotations

import json as json_mod

from invoke import Context

from pipeline.base.errors import UsageError, VerifyFailed
from pipeline.tasks.common import load_config, say, task
from pipeline.tasks.options import LOCAL_ACCEL_HELP, accel_option


@task(auto_shortflags=False, help={
    "image": "image name from invoke.yaml",
    "build_a": "the older build id (default: the second newest kept build; with only --build-a given, "
               "it is compared with the published build)",
    "build_b": "the newer build id (default: the newest kept build)",
    "json": "the comparison as one JSON object on stdout",
})
def diff(c: Context, image: str, build_a: str = "", build_b: str = "", json: bool = False) -> None:
    """Compare two builds of an image: packages added/removed/changed, changed inputs, sizes.

    Two kept builds: by default the last two; with only --build-a, that build against the
    published one. It shows packages added, removed and changed (old -> new version), the
    input-hash parts that changed (`file:...` template/kickstart/flake, `iso.lock`, `config`,
    `tool:...`, `imagepipe`), each format's size, and whether the image is bit-for-bit the same.
    (Invoke has no optional positional arguments, hence the two options.)
    """
    from pipeline.contents import diff as diff_mod  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

    cfg = load_config(c)
    img = cfg.image(image)
    if build_b and not build_a:
        raise UsageError("--build-b needs --build-a (the build to compare it with)")
    old, new = diff_mod.pick(cfg.output_dir / img.name, img.name, build_a, build_b)
    result = diff_mod.compare(old, new)
    print(json_mod.dumps(result.as_json(), indent=2) if json else diff_mod.render(result))


@task(auto_shortflags=False, help={
    "image": "image name from invoke.yaml",
    "accel": LOCAL_ACCEL_HELP,
    "json": "build progress as JSON events, then the report as one `check` event on stdout",
    "strict": "exit 1 when the two builds differ (default: report only, exit 0)",
})
def check_reproducible(c: Context, image: str, accel: str = "", json: bool = False, strict: bool = False) -> None:
    """Build an image twice into staging (nothing published) and compare the two results.

    No history rows are written; the two build logs are kept in output/IMAGE/logs/reproducible/
    {a,b}/. Where image files differ it says where: only the container (`qemu-img compare`),
    which MBR/GPT partition or the area outside them, and for ext2/3/4 the superblock fields and
    the files that differ. Exit 0 with the report; --strict: exit 1 when they differ.
    """
    from pipeline.base import events  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)
    from pipeline.build import BuildOptions  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)
    from pipeline.reproducible import check  # noqa: PLC0415 (loaded when the task runs, not by invoke --list)

    cfg = load_config(c)
    img = cfg.image(image)
    report = check(cfg, img, BuildOptions(accel=accel_option(accel, cfg), json=json), say)
    if json:
        verdict = "reproducible" if report.identical else "not reproducible"
        events.write(events.Event("check", verdict, source="imagepipe", fields=report.as_json()), img.name)
    else:
        print(report.render())
    if strict and not report.identical:
        raise VerifyFailed(f"{img.name} is not reproducible: the two builds differ (details above)")
