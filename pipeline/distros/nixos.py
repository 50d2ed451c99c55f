"""NixOS: `nix build` of the project's flake (nixos/), which calls nixpkgs' make-disk-image.nix.

The flake is hand-written; each image's parameters are rendered into nixos/params/<image>.json
(pipeline.render.nix). make-disk-image.nix builds the disk inside a Linux VM of the image's
architecture (and a nix with `kvm`), so only a Linux host of that arch can build it here.
Elsewhere nix's own remote builds take it (pipeline.drivers.nixremote): a builder nix already knows that
offers the image's system with `kvm`, or one named with `--builder HOST` (ssh-ng); without
either, a hint names the remote tasks and the builders that fit.

A build of the project's flake runs on a copy of nixos/ in the staging folder whose only params
file is this image's, with the build's SSH key added for ssh_user (the guest contract): the
committed params stay key-free and nix still evaluates purely (`path:` flake, no --impure). The
copy keeps nixos/flake.lock, so the pinned nixpkgs is the one built from; without a lock nix
resolves nixpkgs itself and the build says to run `invoke update-flake` and commit the lock.
Remote builds use the same staged copy: it is evaluated here, only derivations leave.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.base.errors import HostUnsuitable, ToolMissing
from pipeline.base.run import install_hint, run
from pipeline.contract import GuestView, with_build_key
from pipeline.distros import Profile, Report
from pipeline.drivers import Prepared
from pipeline.model import Config, Image

if TYPE_CHECKING:
    from pipeline.builders.remote import Target
    from pipeline.contents.packages import Package
    from pipeline.drivers.nix import NixDriver
    from pipeline.host import HostFacts
    from pipeline.plan import BuildPlan, Delegated


class NixOS(Profile):
    name = "nixos"
    guest_filesystems = frozenset({"virtiofs", "9p"})  # NixOS's kernel has both (its own test VMs use 9p)
    title = "NixOS"
    tcg_duration = "make-disk-image's VM crawls without KVM: hours"

    @property
    def driver(self) -> NixDriver:
        from pipeline.drivers.nix import NixDriver  # noqa: PLC0415 (kept off the no-op build and the input hash)

        return NixDriver(self)

    def family(self, image: Image) -> str:
        return "nixos"

    def artifact_name(self, image: Image) -> str:
        """make-disk-image's own name (nixos.qcow2): people who know NixOS images expect it."""
        return f"nixos.{image.format.value}"

    def flake_dir(self, root: Path, image: Image) -> Path:
        """The image's flake folder: `flake:` when it is a local path, else the project's nixos/."""
        from pipeline.drivers.nix import flake_dir  # noqa: PLC0415 (kept off the no-op build and the input hash)

        return flake_dir(image, root) or root / "nixos"

    def template(self, root: Path, image: Image) -> Path:
        return self.flake_dir(root, image) / "flake.nix"

    def rendered_files(self, image: Image, root: Path, source: str) -> dict[Path, str]:
        from pipeline.render import nix  # noqa: PLC0415 (kept off the no-op build and the input hash)

        return nix.files(image, root, source)

    def input_files(self, root: Path, image: Image) -> list[Path]:
        """flake.nix, flake.lock (the nixpkgs pin), the image's params and every module."""
        flake = self.flake_dir(root, image)
        modules = flake / "modules"
        tree = [p for p in modules.rglob("*") if p.is_file()] if modules.is_dir() else []
        return [flake / "flake.nix", flake / "flake.lock", flake / "params" / f"{image.name}.json", *tree]

    def hash_tools(self, image: Image) -> list[str]:
        return ["nix"]  # make-disk-image's QEMU comes from nixpkgs, not from the host

    def needed_tools(self, image: Image, facts: HostFacts | None = None) -> dict[str, str]:
        return {"nix": f"building {image.name}", "qemu-img": "verifying images"}

    def host_problem(self, image: Image, facts: HostFacts, cfg: Config) -> HostUnsuitable | None:
        """This host cannot build it and none of nix's configured builders can either."""
        from pipeline.drivers.nixremote import for_configured  # noqa: PLC0415 (kept off the no-op build and the input hash)

        problem = build_host_problem(image, facts)
        if problem is None or for_configured(image, facts.nix_builders) is not None:
            return None
        return HostUnsuitable(problem, remote_hint(image, cfg, facts))

    def engine_route(self, image: Image, facts: HostFacts, cfg: Config, builder: Target | None,
                     accept_new_host_key: bool = False) -> Delegated | None:
        """`--builder HOST`: nix builds it there over ssh-ng. Else, where this host cannot build
        it (another OS or arch, or a nix without `kvm`), nix's configured builders that fit. Else
        None: nix builds here."""
        from pipeline.drivers import nixremote  # noqa: PLC0415 (kept off the no-op build and the input hash)

        if builder is not None:
            if not facts.tool("nix").found:
                raise ToolMissing(f"--builder needs nix here (it evaluates {image.name} and drives the builder's nix)",
                                  f"{install_hint('nix')}; without nix here use the project-sync route: "
                                  f"invoke remote-sync-build {builder.name} --image {image.name}")
            nixremote.need_local_tools()
            store = (facts.nix_config or {}).get("store") or "auto"
            return nixremote.for_builder(builder, image, accept_new_host_key=accept_new_host_key, eval_store=store)
        if build_host_problem(image, facts) is None and nix_has_kvm(facts):
            return None
        return nixremote.for_configured(image, facts.nix_builders)

    def summary(self, image: Image, root: Path, output_dir: Path) -> dict[str, Any]:
        """The flake output that is built and the nixpkgs it is pinned to."""
        from pipeline.drivers.nix import installable, nixpkgs_revision  # noqa: PLC0415 (kept off the no-op build and the input hash)

        flake = self.flake_dir(root, image)
        lock = flake / "flake.lock"
        pinned = (f"nixpkgs {nixpkgs_revision(flake) or '?'} ({lock})" if lock.is_file() else
                  f"NOT PINNED: no {lock} (nix resolves nixpkgs when the build starts; "
                  "run `invoke update-flake` and commit the lock)")
        output = installable(image, root)
        if image.flake is None:  # prepare() builds a copy with this image's params and the build key
            output += " (built from a staged copy of nixos/ with the build key)"
        return {"flake output": output, "nixpkgs": pinned}

    def packages(self, plan: BuildPlan, stage: Path, report: Report) -> list[Package]:
        """The runtime closure of the image's system (store paths, names, versions), evaluated
        from the staged copy the build ran on (its system is the one in the image); over ssh-ng
        it is read from the builder's store, where the system was built."""
        from pipeline.drivers.nix import closure_packages  # noqa: PLC0415 (kept off the no-op build and the input hash)
        from pipeline.drivers.nixremote import SshNg  # noqa: PLC0415 (kept off the no-op build and the input hash)

        copy = staged_flake(stage)
        flake = f"path:{copy}" if copy.is_dir() else None
        route = plan.route
        if isinstance(route, SshNg):
            return closure_packages(plan.image, plan.root, report, flake, store_args=route.store_args(), env=route.env())
        return closure_packages(plan.image, plan.root, report, flake)

    def fetched(self, root: Path, image: Image, build: Path, report: Report) -> None:
        """The flake.lock a builder's nix wrote comes back with its build: it becomes the
        project's lock when there is none yet (nix writes locks, never imagepipe by hand), so
        the next builds here and there evaluate the same nixpkgs; a different one is reported."""
        from pipeline.drivers.nix import adopt_lock, flake_dir  # noqa: PLC0415 (kept off the no-op build and the input hash)

        directory = flake_dir(image, root)
        report_line = adopt_lock(build / "flake.lock", directory / "flake.lock", root) if directory else None
        if report_line:
            report(report_line)

    def manifest_extra(self, plan: BuildPlan) -> dict[str, Any]:
        from pipeline.drivers.nix import nixpkgs_revision  # noqa: PLC0415 (kept off the no-op build and the input hash)

        # None until the flake has a flake.lock
        extra: dict[str, Any] = {"nixpkgs": nixpkgs_revision(self.flake_dir(plan.root, plan.image))}
        if plan.route is not None:
            extra["built_by"] = plan.route.as_manifest()
        return extra


    def accounts_from_config(self, image: Image) -> bool:
        """The project's flake makes its accounts from invoke.yaml; an own `flake:` its own."""
        return image.flake is None

    def guest_agent(self, image: Image) -> bool:
        return image.flake is None  # modules/qemu-guest.nix enables services.qemuGuest

    def prepared_variables(self, image: Image) -> list[str]:
        return ["flake"] if image.flake is None else []

    def prepare(self, plan: BuildPlan, stage: Path, report: Report) -> Prepared:
        """A copy of nixos/ for this build with only this image's params, the build key added
        for ssh_user; the driver builds `path:<copy>` (an own `flake:` is built as it is)."""
        from pipeline import keys  # noqa: PLC0415 (kept off the no-op build and the input hash)
        from pipeline.render import nix  # noqa: PLC0415 (kept off the no-op build and the input hash)

        image = plan.image
        if image.flake is not None:
            return Prepared()
        source = plan.root / "nixos"
        committed = nix.params_path(plan.root, image)
        if not committed.is_file() or committed.read_text(encoding="utf-8") != nix.dumps(nix.params(image)):
            report(f"note: {committed.relative_to(plan.root)} is not what invoke.yaml renders (building with the"
                   " rendered one): run invoke render and commit it")
        copy = staged_flake(stage)
        shutil.copytree(source, copy, ignore=lambda folder, names: _not_copied(Path(folder) == source, names))
        params = copy / "params" / f"{image.name}.json"
        params.parent.mkdir(exist_ok=True)
        keyed = with_build_key(image, keys.public_key(plan.ssh_key), *plan.extra_keys)
        params.write_text(nix.dumps(nix.params(keyed)), encoding="utf-8")
        return Prepared(variables={"flake": f"path:{copy}"})

    def announce(self, plan: BuildPlan, facts: HostFacts) -> str | None:
        """Where nix builds it; warnings: no flake.lock (nixpkgs unpinned, on every route: the
        evaluation is here), nix's `kvm` feature (make-disk-image's VM crawls without KVM) when
        it builds here."""
        from pipeline.drivers.nix import kvm_warnings  # noqa: PLC0415 (kept off the no-op build and the input hash)
        from pipeline.drivers.nixremote import for_configured, tcg_warning  # noqa: PLC0415 (kept off the no-op build and the input hash)

        flake = self.flake_dir(plan.root, plan.image)
        lock = [lock_warning(flake.relative_to(plan.root))] if plan.image.flake is None and not (
            flake / "flake.lock").is_file() else []
        if plan.route is not None:
            slow = tcg_warning(plan.route, plan.image, facts.os)  # type: ignore[arg-type]
            return "\n".join([f"nix builds it on {plan.route.describe()}", *(f"warning: {w}" for w in lock),
                              *([f"warning: {slow}"] if slow else [])])
        lines = [f"warning: {w}" for w in lock]
        warnings = kvm_warnings(facts.nix_config, facts)
        builders = for_configured(plan.image, facts.nix_builders)
        if warnings and builders is not None:  # nix tries its builders before building here
            lines.append(f"nix may send it to one of {builders.describe()}")
        else:
            lines += [f"warning: {w}" for w in warnings]
        return "\n".join(lines) or None


STAGED_FLAKE = "flake"


def staged_flake(stage: Path) -> Path:
    """Where a build's copy of nixos/ lives: with the files the package list reads after the
    build (<stage>/collected/, removed by the build once the manifest has them)."""
    from pipeline.contents.packages import COLLECTED  # noqa: PLC0415 (kept off the no-op build and the input hash)

    return stage / COLLECTED / STAGED_FLAKE


def _not_copied(top: bool, names: list[str]) -> list[str]:
    """What the staged copy of nixos/ leaves out: other images' params, result links, .git."""
    return [n for n in names if n == ".git" or n.startswith("result") or (top and n == "params")]


def lock_warning(flake: Path) -> str:
    return (f"{flake}/flake.lock is missing: nix resolves nixpkgs itself for this build, so builds differ "
            f"between machines and days. Run `invoke update-flake` and commit {flake}/flake.lock")


def update_flake(root: Path) -> str:
    """`nix flake update` in nixos/ (nix writes flake.lock); a one-line summary of the change."""
    from pipeline.drivers.nix import nix_argv, nixpkgs_revision, short_pin  # noqa: PLC0415 (kept off the no-op build and the input hash)

    flake = root / "nixos"
    lock = flake / "flake.lock"
    before = lock.read_bytes() if lock.is_file() else None
    run(nix_argv("flake", "update"), cwd=flake, timeout=900,
        hint="nix flake update needs the network to fetch nixpkgs")
    after = lock.read_bytes() if lock.is_file() else None
    rev = nixpkgs_revision(flake)
    pinned = f"nixpkgs {short_pin(rev)}" if rev else "nixpkgs"
    if after == before:
        return f"nixos/flake.lock unchanged ({pinned})"
    return f"nixos/flake.lock {'updated' if before else 'written'} by nix ({pinned}): commit it"


# What the guest contract reads from an evaluated NixOS configuration (`nix eval --apply` on
# nixosConfigurations.<image>.config); `guest_view` turns the result into a GuestView.
CONTRACT_APPLY = """c: {
  keys = builtins.mapAttrs (n: u: u.openssh.authorizedKeys.keys) c.users.users;
  groups = builtins.mapAttrs (n: u: u.extraGroups or [ ]) c.users.users;
  rootHash = c.users.users.root.hashedPassword or null;
  sudoRules = c.security.sudo.extraRules;
  wheelNeedsPassword = c.security.sudo.wheelNeedsPassword;
  permitRootLogin = c.services.openssh.settings.PermitRootLogin;
  passwordAuthentication = c.services.openssh.settings.PasswordAuthentication;
  kernelParams = c.boot.kernelParams;
  powerKey = c.services.logind.settings.Login.HandlePowerKey or "poweroff";
  agent = c.services.qemuGuest.enable;
}"""


def guest_view(data: Mapping[str, Any]) -> GuestView:
    """The GuestView of an evaluated NixOS configuration (the output of CONTRACT_APPLY)."""
    sudo = {u for rule in data["sudoRules"] for u in rule.get("users", [])
            if any(c.get("command") == "ALL" and "NOPASSWD" in c.get("options", []) for c in rule.get("commands", []))}
    if not data["wheelNeedsPassword"]:
        sudo |= {n for n, groups in data["groups"].items() if "wheel" in groups}
    consoles = [p.split("=", 1)[1].split(",")[0] for p in data["kernelParams"] if p.startswith("console=")]
    return GuestView(
        keys={n: frozenset(k) for n, k in data["keys"].items()},
        passwordless_sudo=frozenset(sudo),
        root_password_ssh=data["permitRootLogin"] == "yes" and bool(data["passwordAuthentication"])
        and data["rootHash"] is not None,
        console=consoles[-1] if consoles else None,
        power_button=data["powerKey"] == "poweroff",
        guest_agent=bool(data["agent"]),
    )


def build_host_problem(image: Image, facts: HostFacts) -> str | None:
    """Why this host cannot build `image` (None when it can). Pure."""
    if facts.os == "darwin":
        return (f"{image.name} cannot be built on macOS: NixOS disk images are made inside a Linux VM "
                "by make-disk-image.nix, which needs a Linux builder")
    if facts.os != "linux":
        return f"{image.name} cannot be built on {facts.os}: NixOS disk images need a Linux host"
    if facts.arch is not image.arch:
        return (f"{image.name} is an {image.arch.value} image and this host is {facts.machine}: "
                "NixOS disk images cannot be cross-built")
    return None


def nix_has_kvm(facts: HostFacts) -> bool:
    """This host's nix offers `kvm` (make-disk-image needs it); without it, nix's configured
    builders that fit take the build. Pure."""
    return "kvm" in (facts.nix_config or {}).get("system-features", "").split()


def remote_task(image: Image) -> str:
    """The task that builds `image` on a remote builder."""
    if image.name == f"nixos-{image.arch.value}":
        return f"invoke remote-build-nixos-{image.arch.short} HOST"
    return f"invoke remote-sync-build HOST --image {image.name}"


def remote_hint(image: Image, cfg: Config, facts: HostFacts | None = None) -> str:
    """Where else `image` can be built: the remote task, nix's own builders, and the configured
    builders that fit."""
    from pipeline.drivers.nixremote import not_fitting  # noqa: PLC0415 (kept off the no-op build and the input hash)

    arch = image.arch.value
    fitting = [b.name for b in cfg.builders.values() if b.arch is image.arch]
    unknown = [b.name for b in cfg.builders.values() if b.arch is None]
    lines = [f"build it on a Linux {arch} machine: {remote_task(image)}"]
    nix_here = facts is not None and facts.tool("nix").found
    if nix_here and image.name != f"nixos-{image.arch.value}":
        lines.append(f"or, nix building it on an SSH host: invoke build {image.name} --builder HOST")
    if facts is not None and facts.nix_builders:
        lines.append(f"nix's configured builders cannot: {not_fitting(image, facts.nix_builders)}")
    elif nix_here:
        lines.append(f"or give nix a Linux {arch} builder with kvm (`builders` in nix.conf or /etc/nix/machines)")
    if fitting:
        lines.append(f"configured {arch} builders: {', '.join(fitting)}")
    else:
        lines.append(f"no builder with `arch: {arch}` is configured: add one under builders: in {cfg.source}")
    if unknown:
        lines.append(f"builders without an arch (add `arch:` to use them): {', '.join(unknown)}")
    return "\n  ".join(lines)


PROFILE = NixOS()
