"""The test lanes: the project set up and tested in a root of another Debian suite.

Each lane makes (or takes from the cache) its root (tests/lanes/roots.py), gives it the host's
packer (no suite after Debian 12 packages Packer; Debian 12's binary runs there), clones the
project into it (committed files only), runs the README's first command there, `./setup.sh`
with IMAGEPIPE_OFFLINE=1 (system packages from Debian's mirror, the venv from PyPI, then the demo
build), and then a chosen part of the suite under that root's tools. It prints the versions of
the tools it used and pytest's summary, and exits non-zero when anything failed.

  trixie   the quick start on Debian 13, the current stable release: setup.sh's Packer paths
           without a packer (IMAGEPIPE_OFFLINE=1 stops and names every way; the dry run shows
           HashiCorp's repository set up for Debian 13), then setup.sh for real and the demo
           build, run/ssh/stop and boot tests.
  current  the newest suite (forky): the newest Nix, QEMU, OVMF, rsync, OpenSSH and Python. The
           whole unit suite and the tests that cross a tool boundary: the nix driver (build,
           route check, --builder, nix.conf builders, ssh-ng, path-info, locks, lint), QEMU
           (argv, QMP, firmware descriptors, real boots of the demo guest), rsync and OpenSSH
           (sync, fetch, resume, host-key pinning, ssh_config).
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.lanes import roots
from tests.lanes.roots import LaneError, Root, log

CHECKOUT = Path(__file__).resolve().parents[2]
PROJECT = "/root/imagepipe"  # where the clone lives in the root
FRESH = ("ca-certificates", "git")  # a fresh machine's own: a person cloned the project with git

INTEGRATION = "tests/integration/"
TRIXIE_TESTS = (
    INTEGRATION + "test_demo_build.py",
    INTEGRATION + "test_vm.py::test_run_ssh_status_stop",
    INTEGRATION + "test_vm.py::test_test_image_and_test_all",  # the boot test
)
CURRENT_TESTS = (
    "tests/unit",
    # nix: build, route check, --builder, nix.conf builders, ssh-ng, path-info, lock handling, lint
    INTEGRATION + "test_nix_build.py",
    INTEGRATION + "test_nix_remote.py",
    INTEGRATION + "test_nix_contract.py",
    INTEGRATION + "test_contents_nix.py",
    INTEGRATION + "test_nix_flake_eval.py",
    # QEMU: argv, QMP, firmware descriptors, real boots of the demo guest (packer + QEMU)
    INTEGRATION + "test_demo_build.py",
    INTEGRATION + "test_vm.py",
    INTEGRATION + "test_guest_contract.py",
    # rsync and OpenSSH: sync, fetch, resume, host-key pinning, ssh_config parsing
    INTEGRATION + "test_remote.py",
    INTEGRATION + "test_ssh_cipher.py",
    INTEGRATION + "test_ssh_handover.py",
    INTEGRATION + "test_rsync_probe.py",  # the version probe against the newest rsync
)
# Left out of the current lane to keep CI within its time (measured in the newest suite's root,
# 2 cores): each checks imagepipe's own logic (locks, ports, dispatch, the staged layout) more than
# the tools, and runs in the main run; the tool boundary each touches is crossed by a kept test.
CURRENT_DESELECT = (
    INTEGRATION + "test_vm.py::test_boot_test_fails_with_a_wrong_key_within_the_deadline",    # 90 s
    INTEGRATION + "test_vm.py::test_two_boot_tests_of_one_image_take_turns",                   # 33 s
    INTEGRATION + "test_vm.py::test_boot_test_function_on_the_staged_layout",                  # 18 s
    INTEGRATION + "test_vm.py::test_busy_port_picks_another_and_ssh_works",                    # 11 s
    INTEGRATION + "test_guest_contract.py::test_root_ssh_is_checked_both_ways",                # 49 s
    INTEGRATION + "test_remote.py::test_remote_build_spreads_images_over_builders_in_parallel",  # 37 s
    INTEGRATION + "test_remote.py::test_a_fetch_holds_the_image_lock_and_applies_retention",   # 23 s
)
# tool → the command that prints its version in the root (first line kept)
VERSIONS = {
    "debian": ("cat", "/etc/debian_version"),
    "python": ("python3", "--version"),
    "packer": ("packer", "version"),
    "qemu": ("qemu-system-x86_64", "--version"),
    "ovmf": ("dpkg-query", "-W", "-f", "${Version}", "ovmf"),
    "nix": ("nix", "--version"),
    "rsync": ("rsync", "--version"),
    "openssh": ("ssh", "-V"),
}


@dataclass(frozen=True)
class Lane:
    name: str
    suite: str
    title: str
    packages: Callable[[], list[str]]          # what the cached root holds
    tests: Sequence[str]
    deselect: Sequence[str] = ()
    checks: Callable[[Root], list[tuple[str, bool, str]]] = lambda root: []  # before setup.sh
    versions: Sequence[str] = ()


def setup_sh_packages() -> list[str]:
    """setup.sh's own package list: the root holds it already, so setup.sh's apt-get install
    finds everything there (apt-get update still asks the mirror) and only the tests' time counts."""
    return [*roots.setup_packages((CHECKOUT / "setup.sh").read_text(encoding="utf-8")), *FRESH]


def quickstart_checks(root: Root) -> list[tuple[str, bool, str]]:
    """setup.sh on Debian 13 before any packer is there, in a network namespace of its own
    (`unshare --net`: a contact would fail): IMAGEPIPE_OFFLINE=1 stops naming every way; the dry
    run shows HashiCorp's repository being set up for trixie."""
    out: list[tuple[str, bool, str]] = []
    offline = root.run(["unshare", "--net", "./setup.sh"], cwd=PROJECT, env={"IMAGEPIPE_OFFLINE": "1"},
                       check=False, capture=True)
    err = offline.stderr
    ok = (offline.returncode == 1 and "imagepipe needs Packer and found none" in err and "has none" in err
          and "PACKER=/path/to/packer" in err and "signed-by=" in err and "SHA256SUMS.sig" in err
          and "E: " not in err and not (root.path / PROJECT.lstrip("/") / ".venv").exists())
    out.append(("IMAGEPIPE_OFFLINE=1 ./setup.sh without packer stops with the message, contacting nothing",
                ok, f"exit {offline.returncode}\n{offline.stdout[-1500:]}{err[-2500:]}"))
    dry = root.run(["unshare", "--net", "./setup.sh", "--dry-run"], cwd=PROJECT, check=False, capture=True)
    want = ["curl -fsSL --proto =https --tlsv1.2", "gpg --batch --show-keys",
            "] https://apt.releases.hashicorp.com trixie main",
            "install -y -qq --no-install-recommends packer"]
    ok = dry.returncode == 0 and all(piece in dry.stdout for piece in want)
    out.append(("./setup.sh --dry-run without packer prints HashiCorp's apt repository set up for trixie",
                ok, f"exit {dry.returncode}\n{dry.stdout[-3000:]}{dry.stderr[-1500:]}"))
    return out


LANES = {
    "trixie": Lane("trixie", "trixie", "the quick start on Debian 13", lambda: list(FRESH), TRIXIE_TESTS,
                   checks=quickstart_checks, versions=("debian", "python", "packer", "qemu")),
    "current": Lane("current", roots.NEWEST, "the newest Nix, QEMU, OVMF, rsync, OpenSSH and Python",
                    setup_sh_packages, CURRENT_TESTS, CURRENT_DESELECT, versions=tuple(VERSIONS)),
}


@dataclass
class Outcome:
    lane: str
    checks: list[tuple[str, bool]] = field(default_factory=list)
    summary: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    times: dict[str, float] = field(default_factory=dict)
    failed: bool = False

    def report(self) -> str:
        lines = [f"==> lane {self.lane}: tools"]
        lines += [f"    {name:8} {version}" for name, version in self.versions.items()]
        lines += [f"    check {'ok  ' if ok else 'FAIL'} {what}" for what, ok in self.checks]
        lines += [f"    {step}: {secs:.0f} s" for step, secs in self.times.items()]
        lines.append(f"==> lane {self.lane}: {self.summary or 'no pytest summary'}"
                     + ("  (FAILED)" if self.failed else ""))
        return "\n".join(lines)


# pytest's closing line, with -q ("6 passed in 1.2s") or without ("=== 6 passed in 1.2s ===")
SUMMARY = re.compile(r"^(?:=+ )?(?:[0-9]+ (?:passed|failed|errors?|skipped|deselected|xfailed|xpassed|warnings?)"
                     r"(?:, )?)+ in [0-9.]+s")


def pytest_summary(output: str) -> str:
    """pytest's closing line ("12 passed, 1 failed in 30.1s"), without its ===."""
    lines = [ln.strip("= ").strip() for ln in output.splitlines() if SUMMARY.match(ln)]
    return lines[-1] if lines else ""


def timed(outcome: Outcome, step: str) -> _Timer:
    return _Timer(outcome, step)


class _Timer:
    def __init__(self, outcome: Outcome, step: str) -> None:
        self.outcome, self.step = outcome, step

    def __enter__(self) -> None:
        self.started = time.monotonic()
        log(f"{self.step} ...")

    def __exit__(self, *exc: object) -> None:
        self.outcome.times[self.step] = time.monotonic() - self.started


def run_lane(lane: Lane, keep: bool = False, pytest_args: Sequence[str] = ()) -> Outcome:
    outcome = Outcome(lane.name)
    started = time.monotonic()
    roots.require_root_and_tools()
    with timed(outcome, "root (made or cached)"):
        tar = roots.ensure_root(lane.suite, lane.packages())
    root = Root.unpack(tar, lane.name)
    try:
        root.cache("pip", "/root/.cache/pip")
        root.cache("apt-archives", "/var/cache/apt/archives")
        root.clone_project(CHECKOUT, PROJECT)
        debs, cached = root.path / PROJECT.lstrip("/") / "output/.cache/debs", roots.deb_cache(tar)
        log(f"{roots.seed_debs(cached, debs)} cached .debs for the demo guest linked in")
        for what, ok, detail in lane.checks(root):
            outcome.checks.append((what, ok))
            log(f"check {'ok' if ok else 'FAILED'}: {what}" + ("" if ok else f"\n{detail}"))
            outcome.failed |= not ok
        outcome.versions["packer"] = root.place_packer().splitlines()[0]
        with timed(outcome, "./setup.sh (IMAGEPIPE_OFFLINE=1: packages, venv, demo build)"):
            setup = root.run(["./setup.sh"], cwd=PROJECT, env={"IMAGEPIPE_OFFLINE": "1"}, check=False)
        roots.keep_debs(debs, cached)
        if setup.returncode != 0:
            outcome.failed = True
            outcome.summary = f"./setup.sh failed (exit {setup.returncode}); no tests ran"
            return outcome
        published = root.path / PROJECT.lstrip("/") / "output/demo-x86_64/demo-x86_64.qcow2"
        outcome.checks.append(("./setup.sh published the demo image", published.is_file()))
        outcome.failed |= not published.is_file()
        for name in lane.versions:
            res = root.run(VERSIONS[name], check=False, capture=True)
            text = (res.stdout or res.stderr).strip().splitlines()
            outcome.versions[name] = text[0] if res.returncode == 0 and text else f"(not found: exit {res.returncode})"
        with timed(outcome, "pytest"):
            argv = [".venv/bin/python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=10", *lane.tests,
                    *[arg for test in lane.deselect for arg in ("--deselect", test)], *pytest_args]
            log("pytest: " + shlex.join(argv))
            tests = root.run(argv, cwd=PROJECT, check=False, tee=True, timeout=3600)
        outcome.summary = pytest_summary(tests.stdout) or f"pytest exited {tests.returncode}"
        outcome.failed |= tests.returncode != 0
    finally:
        outcome.times["lane"] = time.monotonic() - started
        if keep:
            log(f"root kept at {root.path} (--keep)")
        else:
            root.remove()
    return outcome


def main(name: str, argv: Sequence[str] | None = None) -> int:
    lane = LANES[name]
    parser = argparse.ArgumentParser(
        prog=f"tests/lanes/{name}", description=f"The {name} lane: {lane.title}. "
        "Needs root, mmdebstrap and Debian's mirror (and PyPI); the root is cached under "
        "~/.cache/imagepipe/lanes/roots (IMAGEPIPE_CACHE moves ~/.cache/imagepipe). Tests the committed HEAD of this checkout.",
        epilog="Extra arguments after -- go to pytest (e.g. -- -x -k ssh).")
    parser.add_argument("--keep", action="store_true", help="keep the unpacked root afterwards (to look inside)")
    parser.add_argument("--list", action="store_true", help="print the tests the lane runs and exit")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    if args.list:
        print("\n".join([*lane.tests, *(f"(left out) {test}" for test in lane.deselect)]))
        return 0
    try:
        outcome = run_lane(lane, keep=args.keep, pytest_args=extra)
    except LaneError as exc:
        print(f"error: lane {name}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nlane {name}: interrupted", file=sys.stderr)
        return 130
    print(outcome.report(), flush=True)
    return 1 if outcome.failed else 0
