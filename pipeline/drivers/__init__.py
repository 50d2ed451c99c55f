"""Build engines behind one typed contract: Packer (`packer.PackerDriver`), Nix (`nix.NixDriver`).

A distro profile names its driver; `pipeline.build` only ever talks to this protocol:

    check(plan, facts)                  before anything is written: tools present, host fit;
                                        raises ToolMissing / HostUnsuitable with a fix hint
    steps(facts)                        the steps drive() announces, in order (shown as N/M);
                                        the engine's version decides them, not the plan
    command(plan, stage, known)         the engine's command line for a dry run (values the
                                        profile prepares at build time: from `known`, else
                                        shown as placeholders)
    drive(plan, facts, stage, progress, on_error=...)
                                        the build itself, into `stage`; returns the image file
    describe_failure(exc)               one line for the history and the rebuild report
    template_text(image, legacy)        the engine's input that imagepipe renders (Packer's
                                        HCL template), or None when it is hand-written (the
                                        NixOS flake)

Host facts are probed once per command and passed in; a driver never probes on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from pipeline.base.errors import CommandFailed
    from pipeline.host import HostFacts
    from pipeline.model import Image
    from pipeline.plan import BuildPlan
    from pipeline.progress import Progress
    from pipeline.render.hcl import Block


@dataclass(frozen=True)
class Prepared:
    """What a distro's prepare step made for one build (the engine's host-side inputs).

    `variables` are passed to the engine on its command line (logged); `secret_env` only ever
    through the environment (never logged); `extra_files` are staged files published next to the
    image (kernel, initrd).
    """

    variables: dict[str, str] = field(default_factory=dict)
    secret_env: dict[str, str] = field(default_factory=dict)
    extra_files: tuple[Path, ...] = ()


class Source(Protocol):
    """What a driver needs from the distro profile it builds for (it is given the profile when
    made: `Profile.driver`)."""

    def prepare(self, plan: BuildPlan, stage: Path, report: Callable[[str], None]) -> Prepared: ...

    def prepared_variables(self, image: Image) -> list[str]: ...


class PackerSource(Source, Protocol):
    """What the Packer driver needs from a distro profile (pipeline.distros.packer_base.PackerProfile)."""

    def blocks(self, image: Image, legacy: bool) -> list[Block]: ...

    def plan_variables(self, plan: BuildPlan) -> dict[str, str]: ...


class Driver(Protocol):
    """What a build engine offers to `pipeline.build` (see the module docstring)."""

    name: str            # "packer" | "nix": shown to people, recorded in manifests
    tools: tuple[str, ...]  # host tools it runs (doctor, pre-flight, the host probe)

    def check(self, plan: BuildPlan, facts: HostFacts) -> None: ...

    def steps(self, facts: HostFacts) -> list[str]: ...

    def command(self, plan: BuildPlan, stage: Path, known: Mapping[str, str] | None = None) -> list[str]: ...

    def drive(self, plan: BuildPlan, facts: HostFacts, stage: Path, progress: Progress, *,
              on_error: str = "cleanup") -> Path: ...

    def describe_failure(self, exc: CommandFailed) -> str: ...

    def template_text(self, image: Image, legacy: bool = False) -> str | None: ...
