"""NixOS images through nix's own remote builds, against real nix 2.8 and a real sshd builder.

The builder is `hal9000`, OpenSSH's sshd on 127.0.0.1 whose sessions get `SetEnv
NIX_CONF_DIR=<builder-nix>`: its `nix-daemon --stdio` (what ssh-ng runs) reads that nix.conf,
which gives it `kvm`, lists aarch64-linux in extra-platforms (the fixture's aarch64 derivations
only run /bin/sh, so this x86_64 machine stands in for an aarch64 builder) and sets a
post-build-hook that appends every derivation it builds to a marker file. A line there proves
the build ran in the builder's nix, reached over ssh-ng - this side's nix has no such hook.

Shared-store caveat: the builder's store is this machine's /nix/store. If this side used it too,
"copying 0 paths" would be all there is to see (and nix's own builders would deadlock on the
output lock the client holds). So this side's nix uses a chroot store of its own
(`store = <tmp>/local-store`, evaluation only: it never builds), and everything that crosses
between the two stores crosses for real over ssh-ng: derivations to the builder, and for nix's
configured builders the results back. The image of the ssh-ng route comes back by rsync over
the same ssh_config and known_hosts. This side's nix has no `kvm`, so it could not build the
images itself either.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml

from pipeline.output import artifacts
from tests.support import (
    NEEDS_NIX_STORE,
    NEEDS_PTY,
    ROOT,
    checkout_copy,
    invoke,
    project_copy,
    require_tool,
    write_config,
)
from tests.support.sshd import SshHost, builder_host

FIXTURE = ROOT / "tests" / "fixtures" / "nixflake"
BASE_NIX = ["build-users-group =", "sandbox = false", "substituters =", "experimental-features = nix-command flakes"]


def _nix_conf(folder: Path, *lines: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "nix.conf").write_text("\n".join([*BASE_NIX, *lines, ""]))
    return folder


@pytest.fixture(scope="module")
def builders(tmp_path_factory: pytest.TempPathFactory):
    """hal9000 (kvm, x86_64 + aarch64 stand-in, post-build-hook marker) and `plain` (a nix with
    no features and no extra platforms), one ssh_config for both, and this side's nix settings."""
    for tool, pkg in (("nix", "nix-bin"), ("rsync", "rsync"), ("ssh", "openssh-client"), ("qemu-img", "qemu-utils")):
        require_tool(tool, pkg)
    if not Path("/usr/sbin/sshd").exists():
        pytest.fail("sshd not found: install it with `sudo apt-get install openssh-server` (.ci/run does)")
    base = tmp_path_factory.mktemp("nixbuilders")
    marker = base / "built-on-hal9000.log"
    hook = base / "post-build-hook.sh"
    hook.write_text(f'#!/bin/sh\necho "$DRV_PATH" >> {marker}\n')
    hook.chmod(0o755)
    hal_nix = _nix_conf(base / "hal9000-nix", "system-features = kvm big-parallel", "extra-platforms = aarch64-linux",
                        f"post-build-hook = {hook}")
    plain_nix = _nix_conf(base / "plain-nix", "system-features =", "extra-platforms =")
    hal = SshHost(base / "sshd-hal9000", extra_config=(f"SetEnv NIX_CONF_DIR={hal_nix}",)).start()
    plain = SshHost(base / "sshd-plain", extra_config=(f"SetEnv NIX_CONF_DIR={plain_nix}",)).start()
    try:
        known = base / "known_hosts"
        known.write_text(hal.known_hosts_line() + plain.known_hosts_line())
        ssh_config = hal.client_config(base / "ssh_config", known)
        with ssh_config.open("a") as f:
            f.write(plain.client_config(base / "plain_config", known, alias="plain").read_text())
        local_store = base / "local-store"
        local_nix = "\n".join([*BASE_NIX, "system-features =", f"store = {local_store}"])
        yield {"base": base, "hal": hal, "plain": plain, "marker": marker, "ssh_config": ssh_config,
               "known_hosts": known, "local_store": local_store, "nix_config": local_nix}
    finally:
        hal.stop()
        plain.stop()


def _marks(b: dict) -> list[str]:
    return b["marker"].read_text().splitlines() if b["marker"].exists() else []


def _project(b: dict, tmp_path: Path, extra: dict | None = None) -> tuple[Path, Path]:
    """A fresh fixture flake (new nonce: nix really builds) and a config building from it."""
    flake = tmp_path / "flake"
    shutil.copytree(FIXTURE, flake)
    (flake / "nonce").write_text(uuid.uuid4().hex)
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", out, {
        "ssh_config_path": str(b["ssh_config"]),
        "images": {"nixos-x86_64": {"flake": str(flake), "attribute": "packages.x86_64-linux.kvm-image"},
                   "nixos-aarch64": {"flake": str(flake)}},
        **(extra or {}),
    })
    return cfg, out


def _out(res: subprocess.CompletedProcess[str]) -> str:
    return res.stdout + res.stderr


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _store_path(manifest_log: str, name: str) -> str:
    """The store path of `name` from a `copy the image from ... (/nix/store/...)` step line."""
    for line in manifest_log.splitlines():
        if "copy the image from" in line and name in line:
            return line.rsplit("(", 1)[1].rstrip(")")
    raise AssertionError(f"no copy step for {name} in:\n{manifest_log}")


@pytest.mark.slow
@NEEDS_NIX_STORE
def test_builder_option_builds_over_ssh_ng_on_the_builder_and_publishes_here(builders, tmp_path):
    b = builders
    cfg, out = _project(b, tmp_path)
    before = _marks(b)
    logins = b["hal"].log.read_text().count("Accepted publickey")
    res = invoke(["build-nixos-x86", "--builder", "hal9000"], cfg, timeout=600, env={"NIX_CONFIG": b["nix_config"]})
    text = _out(res)
    assert res.returncode == 0, text
    assert "nix builds it on builder hal9000 over ssh-ng" in text
    assert "needs x86_64-linux with kvm" in text  # read from the derivation's requiredSystemFeatures
    # hal9000 lists kvm; whether its /dev/kvm gives a VM KVM is read there (it is this machine)
    flags = re.search(r"(^| )(vmx|svm)( |$)", Path("/proc/cpuinfo").read_text(), re.M)
    if Path("/dev/kvm").exists() and flags:
        assert "will run under TCG" not in text, text
    else:
        assert "will run under TCG, not KVM" in text and "(read on hal9000: " in text, text
    # the derivations went from this side's store to the builder's, and the builder's nix built them
    assert "to 'ssh-ng://hal9000'" in text and "fixture-kvm-image.drv' to 'ssh-ng://hal9000'" in text
    new = [m for m in _marks(b) if m not in before]
    assert any(m.endswith("-fixture-kvm-image.drv") for m in new), new
    assert any(m.endswith("-nixos-system-nixos-x86_64-26.05.drv") for m in new), new
    # evaluated here: the .drv is in this side's store; built there: the image is not
    store_out = _store_path(text, "fixture-kvm-image")
    image_drv = next(m for m in new if m.endswith("-fixture-kvm-image.drv"))
    assert (b["local_store"] / image_drv.lstrip("/")).is_file()
    assert not (b["local_store"] / store_out.lstrip("/")).exists()
    # ...and came back by rsync, verified and published here
    assert "copied nixos.qcow2 from hal9000" in text
    image_dir = out / "nixos-x86_64"
    manifest = artifacts.read_manifest(image_dir)
    assert manifest is not None and manifest["host"]["where"] == "hal9000"
    assert manifest["built_by"]["route"] == "ssh-ng" and manifest["built_by"]["store"] == "ssh-ng://hal9000"
    assert "kvm" in manifest["built_by"]["features"]
    assert artifacts.verify_published(image_dir) == _sha256(Path(store_out) / "nixos.qcow2")
    assert {p["name"] for p in manifest["packages"]} >= {"hello", "openssh"}  # the closure in the builder's store
    # one SSH login: the probe's OpenSSH master carries nix's ssh-ng session, rsync and the package list
    assert b["hal"].log.read_text().count("Accepted publickey") - logins == 1
    history = invoke(["history", "--json"], cfg, timeout=60)
    rows = [json.loads(line) for line in history.stdout.splitlines() if line.startswith("{")]
    assert rows and rows[0]["location"] == "hal9000", history.stdout


@pytest.mark.slow
@NEEDS_NIX_STORE
def test_configured_nix_builder_takes_an_image_this_host_cannot_build(builders, tmp_path):
    """nix.conf's `builders` (a machines file) offers aarch64-linux with kvm: build-nixos-arm on this
    x86_64 host goes there instead of being refused; nix drives the builder with its own ssh."""
    b = builders
    cfg, out = _project(b, tmp_path)
    refused = invoke(["build-nixos-arm"], cfg, timeout=300, env={"NIX_CONFIG": b["nix_config"]})
    assert refused.returncode == 3, _out(refused)
    assert "cannot be cross-built" in refused.stderr and "`builders` in nix.conf" in refused.stderr

    machines = tmp_path / "machines"
    machines.write_text("# the aarch64 builder\nssh-ng://hal9000 aarch64-linux - 1 1 kvm,big-parallel\n")
    env = {"NIX_CONFIG": b["nix_config"] + f"\nbuilders = @{machines}",
           # nix's own ssh (as a user's ~/.ssh/config would): imagepipe leaves it alone on this route
           "NIX_SSHOPTS": f"-F {b['ssh_config']} -o BatchMode=yes"}
    doctor = invoke(["doctor"], cfg, timeout=300, env=env)
    assert f"ssh-ng://hal9000  aarch64-linux; big-parallel, kvm  [{machines}]" in doctor.stdout, _out(doctor)
    assert "usable for: nixos-aarch64" in doctor.stdout
    assert "not for nixos-x86_64: builds aarch64-linux, not x86_64-linux" in doctor.stdout

    before = _marks(b)
    res = invoke(["build-nixos-arm"], cfg, timeout=600, env=env)
    text = _out(res)
    assert res.returncode == 0, text
    assert "nix builds it on nix's configured builders: ssh-ng://hal9000" in text
    assert "building fixture-nixos-aarch64-image on ssh-ng://hal9000" in text
    assert any(m.endswith("-fixture-nixos-aarch64-image.drv") for m in _marks(b) if m not in before)
    # nix copied the result back into this side's store; the published image is that copy
    copied = [line for line in text.splitlines() if "-fixture-nixos-aarch64-image' from 'ssh-ng://hal9000'" in line]
    assert copied, text
    store_path = copied[0].split("copying path '")[1].split("'")[0]
    local_copy = b["local_store"] / store_path.lstrip("/") / "nixos.qcow2"
    image_dir = out / "nixos-aarch64"
    assert artifacts.verify_published(image_dir) == _sha256(local_copy)
    manifest = artifacts.read_manifest(image_dir)
    assert manifest is not None and manifest["arch"] == "aarch64" and manifest["host"]["where"] == "ssh-ng://hal9000"
    assert manifest["built_by"]["route"] == "nix-builders"
    assert manifest["built_by"]["machines"][0]["source"] == str(machines)


@NEEDS_NIX_STORE
def test_unknown_host_key_is_refused_before_nix_connects_then_pinned_on_request(builders, tmp_path):
    b = builders
    known = tmp_path / "known_hosts"
    ssh_config = b["hal"].client_config(tmp_path / "ssh_config", known)
    cfg, out = _project(b, tmp_path)
    data = yaml.safe_load(cfg.read_text())
    data["ssh_config_path"] = str(ssh_config)
    cfg.write_text(yaml.safe_dump(data))
    before = _marks(b)
    res = invoke(["build-nixos-x86", "--builder", "hal9000"], cfg, timeout=300, env={"NIX_CONFIG": b["nix_config"]})
    assert res.returncode == 4, _out(res)
    assert "not in known_hosts" in res.stderr and "--accept-new-host-key" in res.stderr, res.stderr
    assert _marks(b) == before and not (out / "nixos-x86_64" / "builds").exists()
    assert not known.exists() or known.read_text() == ""

    res = invoke(["build-nixos-x86", "--builder", "hal9000", "--accept-new-host-key"], cfg, timeout=600,
                 env={"NIX_CONFIG": b["nix_config"]})
    assert res.returncode == 0, _out(res)
    assert b["hal"].known_hosts_line().split()[2] in known.read_text()
    assert artifacts.verify_published(out / "nixos-x86_64")


def test_a_builder_without_the_system_or_the_feature_is_refused_clearly(builders, tmp_path):
    b = builders
    cfg, out = _project(b, tmp_path)
    env = {"NIX_CONFIG": b["nix_config"]}
    res = invoke(["build-nixos-arm", "--builder", "plain"], cfg, timeout=300, env=env)
    assert res.returncode == 3, _out(res)
    assert "builder plain cannot build nixos-aarch64: its nix builds x86_64-linux" in res.stderr
    assert "not aarch64-linux" in res.stderr and not (out / "nixos-aarch64").exists()

    res = invoke(["build-nixos-x86", "--builder", "plain"], cfg, timeout=300, env=env)
    assert res.returncode == 3, _out(res)
    assert "needs x86_64-linux with kvm: plain's nix lacks the feature kvm" in res.stderr, res.stderr
    assert "building" not in _out(res) and artifacts.read_manifest(out / "nixos-x86_64") is None


@pytest.mark.parametrize("name", ["-oProxyCommand=touch CANARY", "hal9000;touch CANARY", "$(touch CANARY)",
                                  "hal9000:/etc", "hal 9000"])
def test_hostile_builder_names_are_refused_before_anything_connects(builders, tmp_path, name):
    cfg, out = _project(builders, tmp_path)
    canary = tmp_path / "CANARY"
    log_before = builders["hal"].log.read_text()
    for args in (["build-nixos-x86", f"--builder={name.replace('CANARY', str(canary))}"],
                 ["remote-build-nixos-x86", f"--host={name.replace('CANARY', str(canary))}"]):
        res = invoke(args, cfg, timeout=60, env={"NIX_CONFIG": builders["nix_config"]})
        assert res.returncode == 2, _out(res)
        assert "builder host" in res.stderr and "refused" in res.stderr
    assert not canary.exists() and not out.exists()
    assert builders["hal"].log.read_text() == log_before  # sshd saw nothing


@pytest.mark.slow
@NEEDS_NIX_STORE
def test_remote_build_nixos_takes_the_ssh_ng_route_when_nix_is_here(builders, tmp_path):
    cfg, out = _project(builders, tmp_path)
    res = invoke(["remote-build-nixos-x86", "hal9000"], cfg, timeout=600, env={"NIX_CONFIG": builders["nix_config"]})
    assert res.returncode == 0, _out(res)
    assert "[hal9000] ssh-ng route (nix is installed here)" in res.stderr
    assert artifacts.read_manifest(out / "nixos-x86_64")["host"]["where"] == "hal9000"  # type: ignore[index]


def _path_without_nix(folder: Path) -> str:
    """A PATH with every program of this one except nix's: this side "has no nix"."""
    folder.mkdir()
    for d in os.environ["PATH"].split(os.pathsep):
        for prog in sorted(Path(d).iterdir()) if Path(d).is_dir() else []:
            if not prog.name.startswith("nix") and not (folder / prog.name).exists():
                (folder / prog.name).symlink_to(prog)
    return str(folder)


@pytest.mark.slow
@NEEDS_PTY
@NEEDS_NIX_STORE
def test_without_nix_here_the_project_sync_route_runs_and_the_builders_lock_comes_back(builders, tmp_path):
    """No nix on this side: remote-build-nixos-x86 syncs the project and builds with the builder's
    imagepipe. The flake has an input but no flake.lock: the builder's nix writes one; the next
    sync leaves it in place (rsync's protect filter), and the fetch brings it back here."""
    b = builders
    project = tmp_path / "project"
    checkout_copy(project)
    # a flake with one input (the fixture, as a path input), so nix writes a real lock
    wrap = project / "wrap"
    shutil.copytree(FIXTURE, wrap / "fixture")
    (wrap / "fixture" / "nonce").write_text(uuid.uuid4().hex)
    (wrap / "flake.nix").write_text('{\n  inputs.fixture.url = "path:./fixture";\n  outputs = { self, fixture }: '
                                    '{ inherit (fixture) packages nixosConfigurations; };\n}\n')
    settings = yaml.safe_load((project / "invoke.yaml").read_text())
    settings["images"]["nixos-x86_64"].update({"flake": "wrap", "attribute": "packages.x86_64-linux.kvm-image"})
    (project / "invoke.yaml").write_text(yaml.safe_dump(settings))
    builder = b["base"] / "sync-builder"
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "out", {
        "ssh_config_path": str(b["ssh_config"]),
        "builders": {"hal9000": {"host": "hal9000", "dir": str(builder), "arch": "x86_64"}}})
    env = {"NIX_CONFIG": b["nix_config"], "PATH": _path_without_nix(tmp_path / "bin")}
    res = invoke(["remote-build-nixos-x86", "hal9000"], cfg, timeout=1800, env=env, cwd=project)
    text = _out(res)
    assert res.returncode == 0, text
    assert "[hal9000] project-sync route (nix is not installed here)" in text
    assert "[hal9000] venv" in text and "published" in text
    builder_lock = builder / "wrap" / "flake.lock"
    assert builder_lock.is_file(), "the builder's nix wrote no flake.lock"
    assert not (wrap / "flake.lock").exists()

    # a second sync must not delete the lock the builder wrote (it is not here yet)
    again = invoke(["remote-sync-build", "hal9000", "--image", "nixos-x86_64"], cfg, timeout=900, env=env, cwd=project)
    assert again.returncode == 0, _out(again)
    assert builder_lock.is_file()

    fetched = invoke(["remote-fetch-nixos-x86", "hal9000"], cfg, timeout=300, env=env, cwd=project)
    assert fetched.returncode == 0, _out(fetched)
    assert "wrap/flake.lock written from the lock the builder's nix wrote" in fetched.stderr
    assert "commit it" in fetched.stderr
    assert (wrap / "flake.lock").read_text() == builder_lock.read_text()


@NEEDS_NIX_STORE
def test_builder_option_dry_run_and_an_output_that_is_the_image_file(builders, tmp_path):
    b = builders
    cfg, out = _project(b, tmp_path)
    env = {"NIX_CONFIG": b["nix_config"]}
    before = _marks(b)
    dry = invoke(["build-nixos-x86", "--builder", "hal9000", "--dry-run"], cfg, timeout=300, env=env)
    assert dry.returncode == 0, _out(dry)
    lines = dry.stdout.splitlines()
    command = lines[lines.index("  command") + 1]  # the summary's command section (stdout)
    assert "--store ssh-ng://hal9000" in command and "--eval-store" in command and "--out-link" not in command
    assert "nix builds it on hal9000" in dry.stdout
    assert _marks(b) == before and not (out / "nixos-x86_64" / "builds").exists()

    data = yaml.safe_load(cfg.read_text())
    data["images"]["nixos-x86_64"]["attribute"] = "packages.x86_64-linux.image-file"
    cfg.write_text(yaml.safe_dump(data))
    res = invoke(["build-nixos-x86", "--builder", "hal9000"], cfg, timeout=600, env=env)
    assert res.returncode == 0, _out(res)
    assert "needs x86_64-linux:" in res.stderr  # this output requires no feature
    store_out = _store_path(_out(res), "fixture-image-file")
    assert artifacts.verify_published(out / "nixos-x86_64") == _sha256(Path(store_out))
    assert (out / "nixos-x86_64" / "nixos.qcow2").resolve().is_file()


def _own_project(tmp_path: Path) -> Path:
    """A project whose nixos/ is the fixture flake (new nonce), so builds go through the staged
    copy of nixos/ with the build key, as builds of the real flake do."""
    root = tmp_path / "proj"
    shutil.copytree(FIXTURE, root / "nixos")
    (root / "nixos" / "nonce").write_text(uuid.uuid4().hex)
    project_copy(root, ("tasks.py", "invoke.yaml", "pyproject.toml", "pipeline"))
    return root


@pytest.mark.slow
@NEEDS_NIX_STORE
def test_ssh_ng_builds_the_same_staged_flake_with_the_build_key_as_a_local_build(builders, tmp_path):
    """The project's own nixos/ (here the fixture): the copy staged for the build, holding this
    image's params with the build key, is what nix evaluates here and builds on hal9000; the
    builder's name comes from `builders:` in invoke.yaml."""
    b = builders
    root = _own_project(tmp_path)
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", out, {
        "ssh_config_path": str(b["ssh_config"]),
        "builders": {"big-iron": {"host": "hal9000", "arch": "x86_64"}}})
    before = _marks(b)
    res = invoke(["build-nixos-x86", "--builder", "big-iron"], cfg, timeout=600, cwd=root,
                 env={"NIX_CONFIG": b["nix_config"]})
    text = _out(res)
    assert res.returncode == 0, text
    assert "nix builds it on builder big-iron over ssh-ng" in text
    build_key = (out / ".keys" / "imagepipe_ed25519.pub").read_text().strip()
    assert f"fixture: authorized keys: {build_key}" in text  # the builder ran the staged params
    assert any(m.endswith("-fixture-nixos-image.drv") for m in _marks(b) if m not in before)
    (line,) = [s for s in text.splitlines() if "nix build path:" in s]
    assert "/collected/flake#packages.x86_64-linux.nixos-x86_64-image on big-iron" in line
    assert not (root / "nixos" / "params").exists(), "nothing is written into the project's flake"
    manifest = artifacts.read_manifest(out / "nixos-x86_64")
    assert manifest is not None and manifest["host"]["where"] == "big-iron"
    assert {p["name"] for p in manifest["packages"]} >= {"hello", "openssh"}  # the staged system's closure
    assert artifacts.verify_published(out / "nixos-x86_64")


@pytest.mark.slow
@NEEDS_NIX_STORE
def test_build_nixos_x86_goes_to_a_configured_builder_when_this_nix_lacks_kvm(builders, tmp_path):
    """The issue's "done when": a host with nix and a configured Linux builder; the plain
    `invoke build-nixos-x86` builds through it (this side's nix has no kvm)."""
    b = builders
    cfg, out = _project(b, tmp_path)
    machines = tmp_path / "machines"
    machines.write_text("ssh-ng://hal9000 x86_64-linux - 1 1 kvm,big-parallel\n")
    # max-jobs = 0: this side's evaluation-only store must not take the dependencies that need no
    # kvm (a real x86_64 host would build those itself; here they would fail for want of /bin/sh)
    env = {"NIX_CONFIG": b["nix_config"] + f"\nbuilders = @{machines}\nmax-jobs = 0",
           "NIX_SSHOPTS": f"-F {b['ssh_config']} -o BatchMode=yes"}
    before = _marks(b)
    res = invoke(["build-nixos-x86"], cfg, timeout=600, env=env)
    text = _out(res)
    assert res.returncode == 0, text
    assert "nix builds it on nix's configured builders: ssh-ng://hal9000" in text
    assert any(m.endswith("-fixture-kvm-image.drv") for m in _marks(b) if m not in before)
    manifest = artifacts.read_manifest(out / "nixos-x86_64")
    assert manifest is not None and manifest["host"]["where"] == "ssh-ng://hal9000"
    assert manifest["built_by"]["route"] == "nix-builders"
    assert artifacts.verify_published(out / "nixos-x86_64")


_COPIED = re.compile(r"copied nixos\.qcow2 from hal9000: (\d+) bytes in [0-9.]+s \((.*)\)$", re.M)


@pytest.mark.slow
@NEEDS_NIX_STORE
def test_remote_build_nixos_copies_back_compressed_per_link_and_as_a_delta(builders, tmp_path):
    """remote-build-nixos-x86 (the ssh-ng route) against a hal9000 that is another machine where
    this user can make one (root: a network namespace of its own): the image comes back
    compressed as the measured link calls for; a rebuild (a new derivation) comes back as a delta
    against the image published here, moving a fraction of what the first copy moved."""
    b = builders
    with builder_host(tmp_path / "sshd", extra_config=(f"SetEnv NIX_CONF_DIR={b['base'] / 'hal9000-nix'}",)) as host:
        known = tmp_path / "known_hosts"
        known.write_text(host.known_hosts_line())
        cfg, out = _project(b, tmp_path, {"ssh_config_path": str(host.client_config(tmp_path / "ssh_config", known))})
        env = {"NIX_CONFIG": b["nix_config"]}
        copied = []
        for nonce in ("one", "two"):
            (tmp_path / "flake" / "nonce").write_text(f"{nonce}-{uuid.uuid4().hex}")
            before = _marks(b)
            res = invoke(["remote-build-nixos-x86", "hal9000"], cfg, timeout=600, env=env)
            text = _out(res)
            assert res.returncode == 0, text
            assert "ssh-ng route" in text and any(m.endswith("-fixture-kvm-image.drv") for m in _marks(b) if m not in before)
            m = _COPIED.search(text)
            assert m, text
            copied.append((int(m.group(1)), m.group(2)))
            store_out = _store_path(text, "fixture-kvm-image")
            assert artifacts.verify_published(out / "nixos-x86_64") == _sha256(Path(store_out) / "nixos.qcow2")
    (first, how1), (second, how2) = copied
    size = (out / "nixos-x86_64" / "nixos.qcow2").stat().st_size  # the fixture's qcow2: mostly zeros
    if host.netns is not None:
        assert re.match(r"(lz4|zstd level [13]) \(link measured at [0-9.]+ [MG]bit/s", how1), how1
        assert first < size // 4, (copied, size)  # compressed
    else:
        assert how1 == "uncompressed (hal9000 is this machine)", how1
        assert first > size // 2, (copied, size)
    assert "delta" not in how1 and how2.endswith(", a delta against the image published here"), how2
    assert second <= first and second < size // 20, (copied, size)  # the rebuild's bytes are the same
