"""Distro profiles: everything that differs between distros, behind one small interface.

Generic code (config, plan, build, inputs, doctor, lint, vm, rebuild, render) asks the image's
profile and never branches on the distro. A profile says:

    driver                  which engine builds it (a `pipeline.drivers.Driver`: packer or nix)
    family(image)           the folder its committed files live under (packer/<family>/..., ...)
    artifact_name(image)    the published image file's name
    template(root, image)   what the driver builds from (a Packer template, a flake.nix)
    rendered_files(...)     the generated, committed files it owns (what `invoke render` writes)
    input_files / input_parts / hash_tools
                            what goes into the input hash (files, pins, tool versions)
    needed_tools(image, facts)
                            tools this host needs for it (doctor, pre-flight)
    host_problem(image, facts, cfg)
                            why this host cannot build it, with where else it can be built
    engine_route(image, facts, cfg, builder, accept_new_host_key)
                            when its engine builds it on another machine itself (NixOS: nix's
                            remote builds), that route; None: it is built here
    prepare(plan, stage, report)
                            host-side preparation of one build (downloads, blank disks, firmware
                            copies) and the values the driver passes on
    boot_info(image)        direct-kernel-boot files, for run and the boot test (None: firmware boots)
    ephemeral_root          True when the guest's root (and its SSH host keys) is new on every boot
    first_boot              how the guest reads an instance's NoCloud seed (pipeline.vm.seed):
                            "cloud-init", "imagepipe" (the demo's init: hostname, keys and shared
                            folders, no user-data) or "" (it reads none)
    guest_filesystems       the shared-folder file systems its kernel mounts (virtiofs, 9p)
    manifest_extra(plan)    distro facts for the manifest (e.g. the nixpkgs revision)
    fetched(root, image, build, report)
                            what a build fetched from a builder brings back for the project
                            (NixOS: the flake.lock the builder's nix wrote)
    summary(image, root, output_dir)
                            distro facts for the dry run (the kickstart, the resolved ISO), read
                            without network or writes
    packages(plan, stage, report)
                            what the built image holds (RPMs, the Nix closure, Debian packages):
                            the manifest's package list and the SBOM (pipeline.contents.packages)
    pin                     an external input pinned in a lock file (a `Pin`: AlmaLinux's
                            installer ISO), or None
    variants                builds of the distro for other CPUs, per arch (AlmaLinux 10: x86_64_v2)
    cpu_level(image) / cpu_model(image, accel)
                            the x86-64 level the guest needs (checked before a build) and the QEMU
                            CPU model its build runs on
    accounts_from_config / guest_agent
                            the guest contract (pipeline.contract): whether invoke.yaml's users make
                            the image's accounts, and whether it runs qemu-guest-agent

Adding a distro is one module here with a `PROFILE`, its entry in `BUILTIN`, an image entry in
invoke.yaml and tests (docs/architecture.md, "Adding a distro"). Tests and plugins can `register()` a profile
at run time. Profile modules import heavy libraries (jinja2, hcl2) inside methods only: the
input hash and `invoke --list` must stay fast.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pipeline.base.errors import UsageError
from pipeline.drivers import Prepared

if TYPE_CHECKING:
    from pipeline.base.errors import HostUnsuitable
    from pipeline.builders.remote import Target
    from pipeline.contents.packages import Package
    from pipeline.drivers import Driver
    from pipeline.host import HostFacts
    from pipeline.model import Accel, Arch, Config, Image
    from pipeline.plan import BuildPlan, Delegated

# name -> module holding its PROFILE (imported on first use).
BUILTIN: dict[str, str] = {
    "almalinux": "pipeline.distros.almalinux",
    "nixos": "pipeline.distros.nixos",
    "demo": "pipeline.distros.demo",
    "debian": "pipeline.distros.debian",
}
# name -> the stem of its images' per-image task names (build-STEM, run-STEM, ssh-STEM,
# remote-fetch-STEM: pipeline.tasks.aliases), `{arch}` standing for x86 or arm. A distro not
# listed gets `NAME-{arch}`. A table, not a profile attribute: `invoke --list` makes these
# names and must not import the profiles.
ALIAS_STEMS: dict[str, str] = {
    "almalinux": "alma-{arch}",
    "demo": "demo",  # one image, the offline demo guest: build-demo, run-demo, ssh-demo
}
_registered: dict[str, Profile] = {}

Report = Callable[[str], None]
__all__ = ["BootInfo", "Pin", "Prepared", "Profile", "Report", "artifact_name", "get", "names", "profile", "register"]


@dataclass(frozen=True)
class BootInfo:
    """Direct kernel boot: files published next to the image (relative names) and the command line."""

    kernel: str
    initrd: str
    append: str

    def as_manifest(self) -> dict[str, str]:
        return {"kernel": self.kernel, "initrd": self.initrd, "append": self.append}


class Pin:
    """An external input a distro pins in a lock file, re-resolved by `invoke update-iso` and by
    `rebuild` before it hashes the inputs (AlmaLinux: the installer ISO in iso.lock.json)."""

    what: str = ""  # what is pinned, shown to people ("installer ISO")

    def refresh(self, root: Path, image: Image) -> str:
        """Re-resolve the pinned input (network); a one-line summary of what changed."""
        raise NotImplementedError

    def configured(self, image: Image) -> str | None:
        """When the image names its input itself (so nothing is pinned): a line saying so."""
        return None


class Profile:
    """The base of every distro profile; the defaults fit a distro with nothing special."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""                 # "AlmaLinux", shown to people
    image_defaults: ClassVar[Mapping[str, Any]] = {}  # config values for keys an image leaves out
    ephemeral_root: ClassVar[bool] = False
    first_boot: ClassVar[str] = "cloud-init"
    guest_filesystems: ClassVar[frozenset[str]] = frozenset({"virtiofs"})
    pin: Pin | None = None                    # an input pinned in a lock file, if any
    lima: ClassVar[bool] = False              # `invoke lima-start` can run its generic cloud image
    tcg_duration: ClassVar[str] = ""          # how long a build takes under TCG (the dry run's warning)
    variants: ClassVar[Mapping[Arch, tuple[str, ...]]] = {}  # arch -> builds for other CPUs
    # image keys only some distros read (config load refuses them on the others)
    own_keys: ClassVar[frozenset[str]] = frozenset()
    systemd: ClassVar[bool] = True            # the guest runs systemd (the boot test waits for "running")
    build_vm: ClassVar[bool] = True           # the engine builds inside a VM (a foreign arch is then emulated)

    @property
    def driver(self) -> Driver:
        raise NotImplementedError

    # ------------------------------------------------------------------ configuration

    def config_problems(self, image: Image) -> list[tuple[str, str]]:
        """(key, message) for what this distro refuses in an image's configuration (config load
        reports them with the others). By default: the distro-specific keys of other distros."""
        foreign = {"mirror": image.mirror is not None, "packages": bool(image.packages)}
        return [(key, f"only {_readers(key)} images read it") for key, used in foreign.items()
                if used and key not in self.own_keys]

    # ------------------------------------------------------------------ files and paths

    def family(self, image: Image) -> str:
        """The folder name of this image's committed files (e.g. almalinux10, demo)."""
        return self.name

    def artifact_name(self, image: Image) -> str:
        return f"{image.name}.{image.format.value}"

    def template(self, root: Path, image: Image) -> Path:
        """What the driver builds from."""
        raise NotImplementedError

    def rendered_files(self, image: Image, root: Path, source: str) -> dict[Path, str]:
        """path -> content of every generated, committed file this image owns."""
        return {}

    def input_files(self, root: Path, image: Image) -> list[Path]:
        """The committed files that define the image (existing or not: the hash keeps existing ones)."""
        return [self.template(root, image)]

    def input_parts(self, root: Path, image: Image) -> dict[str, str]:
        """Further named input-hash parts (e.g. a pinned ISO), values already hashed or short."""
        return {}

    def hash_tools(self, image: Image) -> list[str]:
        """Host tools whose version can change what a build produces."""
        return []

    # ------------------------------------------------------------------ this host

    def needed_tools(self, image: Image, facts: HostFacts | None = None) -> dict[str, str]:
        """tool -> why, for building `image` on a host with these facts."""
        return {}

    def host_problem(self, image: Image, facts: HostFacts, cfg: Config) -> HostUnsuitable | None:
        """Why this host cannot build `image` (with where it can), or None."""
        return None

    def engine_route(self, image: Image, facts: HostFacts, cfg: Config, builder: Target | None,
                     accept_new_host_key: bool = False) -> Delegated | None:
        """The machine the engine itself builds `image` on (`builder`: one named on the command
        line), or None to build here. Only engines with remote builds of their own have one."""
        if builder is not None:
            raise UsageError(f"--builder: {self.title} images are not built by an engine with remote builds of "
                             f"its own", hint=f"build on a builder with: invoke remote-sync-build {builder.name} "
                                              f"--image {image.name}")
        return None

    # ------------------------------------------------------------------ one build

    def prepare(self, plan: BuildPlan, stage: Path, report: Report) -> Prepared:
        """Host-side preparation of one build inside `stage`."""
        return Prepared()

    def prepared_variables(self, image: Image) -> list[str]:
        """Names of the values `prepare` supplies (the dry run shows them as placeholders)."""
        return []

    def manifest_extra(self, plan: BuildPlan) -> dict[str, Any]:
        return {}

    def boot_info(self, image: Image) -> BootInfo | None:
        return None

    def fetched(self, root: Path, image: Image, build: Path, report: Report) -> None:
        """A build of `image` fetched from a builder was published in `build` (nothing by default)."""

    def summary(self, image: Image, root: Path, output_dir: Path) -> dict[str, Any]:
        """What the dry run shows about this distro's inputs, found without network or writes.

        Plain keys are shown as they are (a path, a nested dict as lines); three are special:
        `variables` (values the dry-run command can show instead of placeholders), `notes`
        (said loudly) and `problems` ({message, hint, exit_code}: a real build could not start).
        """
        return {}

    def packages(self, plan: BuildPlan, stage: Path, report: Report) -> list[Package]:
        """The packages inside the image just built into `stage` (files the build handed back
        wait in <stage>/collected/). Runs after verification, before publishing."""
        return []

    def cpu_level(self, image: Image) -> int | None:
        """The x86-64 microarchitecture level (2, 3, ...) the guest needs; None: no requirement."""
        return None

    def cpu_model(self, image: Image, accel: Accel) -> str:
        """The QEMU CPU model the build runs on: the host's under KVM/HVF, `max` under TCG."""
        return accel.cpu_model

    # ------------------------------------------------------------------ the guest contract

    def accounts_from_config(self, image: Image) -> bool:
        """True when invoke.yaml's `users` make the image's accounts (config load checks them)."""
        return True

    def guest_agent(self, image: Image) -> bool:
        """True when the image runs qemu-guest-agent (the boot test then expects it to answer)."""
        return False

    def boot_deadline(self, image: Image, accel: Accel) -> float | None:
        """Seconds a boot test waits for the guest's SSH (and then for the login, the agent,
        systemd and the power-off) under `accel`; None: the accelerator's default."""
        return None

    def announce(self, plan: BuildPlan, facts: HostFacts) -> str | None:
        """One line said before the build starts (the accelerator, a warning), or None."""
        return f"accelerator {plan.accel.accel.value} ({plan.accel.reason})"



def _readers(key: str) -> str:
    """The titles of the distros that read image key `key` (for a config error)."""
    return ", ".join(sorted(get(n).title or n for n in names() if key in get(n).own_keys)) or "no"


def names() -> list[str]:
    """Every distro name the configuration may use."""
    return sorted({*BUILTIN, *_registered})


def register(profile: Profile) -> Profile:
    """Make `profile` available under its name (tests, plugins); returns it."""
    if not profile.name:
        raise ValueError("a profile needs a name")
    _registered[profile.name] = profile
    return profile


def unregister(name: str) -> None:
    _registered.pop(name, None)


def get(name: str) -> Profile:
    """The profile called `name` (KeyError when there is none)."""
    if name not in _registered:
        module = importlib.import_module(BUILTIN[name])
        _registered[name] = module.PROFILE
    return _registered[name]


def profile(image: Image) -> Profile:
    """The profile of `image`'s distro."""
    return get(image.distro)


def artifact_name(image: Image) -> str:
    """The published image file's name (the profile decides: NixOS keeps make-disk-image's
    `nixos.qcow2`, the others use the image name)."""
    return profile(image).artifact_name(image)
