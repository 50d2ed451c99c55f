"""Bad input through the real CLI: clear message, exit code != 0, nothing written."""

import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path

from pipeline.base.errors import AccelUnavailable
from pipeline.model import Accel
from tests.support import ROOT, accel_here, invoke, write_config


def test_unknown_image_lists_the_valid_names(tmp_path):
    res = invoke(["build", "demo-x86"], write_config(tmp_path / "c.yaml", tmp_path / "out"))
    assert res.returncode == 2
    assert "unknown image 'demo-x86' (did you mean 'demo-x86_64'?)" in res.stderr
    assert "almalinux10-x86_64" in res.stderr and not (tmp_path / "out").exists()


def test_broken_config_reports_every_problem(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "out",
                       {"images": {"demo-x86_64": {"memory": "4G", "cpu": 2}}})
    res = invoke(["build-demo", "--dry-run"], cfg)
    assert res.returncode == 2
    assert "images.demo-x86_64.memory: expected MiB as an integer, got '4G'" in res.stderr
    assert "images.demo-x86_64.cpu: unknown key (did you mean 'cpus'?)" in res.stderr
    assert "2 problems" in res.stderr


def test_bad_accel_and_on_error(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "out")
    res = invoke(["build-demo", "--accel", "kvn", "--dry-run"], cfg)
    assert res.returncode == 2 and "did you mean 'kvm'" in res.stderr
    res = invoke(["build-demo", "--on-error", "ask"], cfg)
    assert res.returncode == 2 and "cleanup or abort" in res.stderr
    res = invoke(["build-demo", "--accel", "kvm", "--dry-run"], cfg)
    verdict = accel_here(Accel.KVM, purpose="build")
    if isinstance(verdict, AccelUnavailable):  # e.g. /dev/kvm without vmx/svm: one line, exit 3
        assert res.returncode == 3 and verdict.message in res.stderr and "--accel tcg" in res.stderr
    else:  # a host with usable KVM: the dry run plans with it
        assert res.returncode == 0 and "accelerator  kvm" in res.stderr, res.stderr


def path_without(tmp_path: Path, *tools: str) -> str:
    """A PATH that has everything /usr/bin and /usr/sbin have, except `tools`."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for d in ("/usr/local/bin", "/usr/bin", "/usr/sbin"):
        for entry in os.scandir(d):
            if entry.name not in tools and not (bindir / entry.name).exists():
                (bindir / entry.name).symlink_to(entry.path)
    return str(bindir)


def test_missing_packer_gives_the_install_hint(tmp_path):
    assert shutil.which("packer"), "packer must be installed for the rest of the suite (apt-get install packer)"
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "out")
    res = invoke(["build-demo"], cfg, env={"PATH": path_without(tmp_path, "packer")})
    assert res.returncode == 127
    assert "packer not found" in res.stderr and "apt-get install packer" in res.stderr
    assert not (tmp_path / "out" / "demo-x86_64" / "current").exists()
    assert not list((tmp_path / "out" / "demo-x86_64").glob(".staging/*"))


def test_doctor_fails_when_a_required_tool_is_missing(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "out")
    res = invoke(["doctor"], cfg, env={"PATH": path_without(tmp_path, "packer", "qemu-img")})
    assert res.returncode == 127  # README: 127 when a required tool is missing
    assert "packer is missing" in res.stdout and "apt-get install qemu-utils" in res.stdout


def test_output_to_a_full_disk_is_one_line_and_a_failure(tmp_path):
    """`invoke --list > /dev/full`: the output is lost, so the exit status says so, in one line
    (buffered stdout meets it at exit, unbuffered while Invoke prints)."""
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "output")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    for args, extra in itertools.product((["--list"], ["--help", "build"], ["status"]),
                                         ({}, {"PYTHONUNBUFFERED": "1"})):
        with open("/dev/full", "w") as full:
            res = subprocess.run([sys.executable, "-m", "invoke", "-f", str(cfg), *args], cwd=ROOT,
                                 env={**env, **extra}, stdout=full, stderr=subprocess.PIPE, text=True, timeout=60)
        assert res.returncode == 1, (args, extra, res.stderr)
        lines = res.stderr.splitlines()
        assert lines[0] in ("error: writing the output failed: no space left on the device",
                            "error: writing failed: no space left on the device"), (args, extra, res.stderr)
        assert "internal error" not in res.stderr and "Exception" not in res.stderr, (args, extra, res.stderr)


def test_number_options_give_a_one_line_error_not_a_traceback(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "out")
    for args in (["history", "--limit", "x"], ["stop", "demo-x86_64", "--timeout", "soon"],
                 ["test-image", "demo-x86_64", "--timeout", "-3"]):
        res = invoke(args, cfg)
        assert res.returncode == 2, res.stderr
        assert "expects a whole number" in res.stderr and "Traceback" not in res.stderr


def test_a_reader_that_goes_away_is_no_internal_error(tmp_path):
    """`invoke --list | head -2`, `invoke --help build | head -1`: the pipe closes before Invoke
    has written; that is the reader's choice, not an error to report."""
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "output")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    # block-buffered stdout (the default for a pipe) meets the closed pipe at exit, unbuffered
    # while Invoke writes: both
    for args, extra in itertools.product((["--list"], ["--help", "build"]), ({}, {"PYTHONUNBUFFERED": "1"})):
        proc = subprocess.Popen([sys.executable, "-m", "invoke", "-f", str(cfg), *args], cwd=ROOT,
                                env={**env, **extra}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()  # before the child writes a byte: its write gets EPIPE
        err = proc.stderr.read()
        proc.wait(timeout=60)
        assert err == "", (args, extra, err)


def test_a_debian_build_needs_root_and_mmdebstrap_and_says_so(tmp_path):
    """As anyone but root the build is refused before anything is written, with the remote route;
    as root a host without mmdebstrap gets the install hint (exit 127). Nothing is published."""
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "out")
    if os.geteuid() != 0:
        res = invoke(["build", "debian13-x86_64"], cfg)
        assert res.returncode == 3, res.stderr
        assert "building debian13-x86_64 needs root" in res.stderr and "remote-sync-build" in res.stderr
        assert not (tmp_path / "out").exists()  # not even the project key
        return
    res = invoke(["build", "debian13-x86_64"], cfg, env={"PATH": path_without(tmp_path, "mmdebstrap")})
    assert res.returncode == 127, res.stderr
    assert "mmdebstrap not found" in res.stderr and "apt-get install mmdebstrap" in res.stderr
    assert not (tmp_path / "out" / "debian13-x86_64" / "current").exists()
    assert not list((tmp_path / "out" / "debian13-x86_64").glob(".staging/*"))
