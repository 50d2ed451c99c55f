"""setup.sh's way to Packer, run for real up to the point where it would contact HashiCorp.

Nothing here may reach HashiCorp's servers: the download path is checked in a dry run (the
exact commands, nothing run) inside a network namespace of its own (`unshare --net`: any
contact would fail), and IMAGEPIPE_OFFLINE=1 is run for real there. Where Debian 13 has no
packer package, a Debian 12 host is given apt settings whose package lists and status hold no
packer (APT_CONFIG: apt itself answers "no candidate", as on Debian 13); the Debian 13 lane
(tests/lanes/trixie) runs the same against a real Debian 13 root.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support import ROOT, require_tool

NETNS = pytest.mark.needs_root("unshare --net: a network namespace of its own proves nothing was contacted")
FINGERPRINT = "798AEC654E5C15428C8E42EEAA16FCBCA621E701"


def _copy(tmp_path: Path) -> Path:
    """setup.sh alone in a folder of its own: whatever it would create lands there."""
    folder = tmp_path / "project"
    folder.mkdir()
    shutil.copy2(ROOT / "setup.sh", folder / "setup.sh")
    return folder / "setup.sh"


def _path_without_packer(tmp_path: Path) -> str:
    """A PATH with every program of this host but packer."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for folder in ("/usr/local/bin", "/usr/bin", "/usr/sbin", "/bin", "/sbin"):
        for entry in os.scandir(folder) if os.path.isdir(folder) else ():
            link = bin_dir / entry.name
            if entry.name != "packer" and not link.exists() and not link.is_symlink():
                link.symlink_to(entry.path)
    return str(bin_dir)


def _apt_without_packer(tmp_path: Path) -> str:
    """An APT_CONFIG whose sources, lists and dpkg status are empty: apt has no packer candidate."""
    apt = tmp_path / "apt"
    for sub in ("lists/partial", "cache/archives/partial", "parts"):
        (apt / sub).mkdir(parents=True)
    (apt / "status").write_text("")
    conf = apt / "apt.conf"
    conf.write_text(f'Dir::State::Lists "{apt}/lists/";\nDir::State::status "{apt}/status";\n'
                    f'Dir::Cache "{apt}/cache/";\nDir::Etc::sourcelist "/dev/null";\n'
                    f'Dir::Etc::sourceparts "{apt}/parts/";\n')
    return str(conf)


def _setup(script: Path, *args: str, env: dict[str, str], netns: bool = False) -> subprocess.CompletedProcess[str]:
    argv = [str(script), *args]
    if netns:
        argv = [require_tool("unshare", "util-linux"), "--net", *argv]
    base = {k: v for k, v in os.environ.items() if k not in ("PACKER", "IMAGEPIPE_OFFLINE", "IMAGEPIPE_SETUP_DRY_RUN")}
    return subprocess.run(argv, env={**base, **env}, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


def _commands(out: str) -> list[str]:
    return [line[2:] for line in out.splitlines() if line.startswith("+ ")]


def test_a_packer_on_path_is_used_as_it_is(tmp_path: Path):
    require_tool("packer", "packer")
    res = _setup(_copy(tmp_path), "--dry-run", env={})
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"packer: {shutil.which('packer')} (from PATH), Packer v" in res.stdout
    cmds = _commands(res.stdout)
    installs = [c for c in cmds if " install " in c and "apt-get" in c]
    assert installs and not any(c.split()[-1] == "packer" or " packer " in c for c in installs), installs
    assert not any("hashicorp" in c for c in cmds)
    assert not (tmp_path / "project" / ".venv").exists(), "a dry run created the venv"


def test_packer_named_by_the_variable_is_linked_into_the_venv(tmp_path: Path):
    real = os.path.realpath(require_tool("packer", "packer"))
    given = tmp_path / "opt" / "packer"
    given.parent.mkdir()
    shutil.copy2(real, given)
    res = _setup(_copy(tmp_path), "--dry-run", env={"PACKER": str(given), "PATH": _path_without_packer(tmp_path)})
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"packer: {given} (from PACKER), Packer v" in res.stdout
    cmds = _commands(res.stdout)
    assert f"ln -sfn {given} .venv/bin/packer" in cmds
    assert not any(c.endswith(" packer") and "install" in c for c in cmds)
    assert not any("curl" in c or "hashicorp" in c for c in cmds)


def test_a_packer_variable_naming_nothing_stops_at_once(tmp_path: Path):
    res = _setup(_copy(tmp_path), "--dry-run", env={"PACKER": str(tmp_path / "nope")})
    assert res.returncode == 2
    assert f"PACKER={tmp_path / 'nope'} is not an executable file" in res.stderr
    assert not _commands(res.stdout)


def test_the_distribution_package_where_the_release_has_one(tmp_path: Path):
    """Debian 12 packages Packer 1.6.6: without a packer, setup.sh installs it with apt."""
    res = _setup(_copy(tmp_path), "--dry-run", env={"PATH": _path_without_packer(tmp_path)})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "the distribution's package packer 1.6.6" in res.stdout
    install = [c for c in _commands(res.stdout) if "apt-get install" in c]
    assert install and install[0].split()[-1] == "packer"
    assert not any("hashicorp" in c for c in _commands(res.stdout))


@NETNS
def test_offline_without_packer_stops_naming_every_way(tmp_path: Path):
    """IMAGEPIPE_OFFLINE=1 for real (not a dry run), in a network namespace with no way out."""
    script = _copy(tmp_path)
    res = _setup(script, env={"IMAGEPIPE_OFFLINE": "1", "PATH": _path_without_packer(tmp_path),
                              "APT_CONFIG": _apt_without_packer(tmp_path)}, netns=True)
    assert res.returncode == 1, res.stdout + res.stderr
    err = res.stderr
    assert "error: imagepipe needs Packer and found none" in err and "IMAGEPIPE_OFFLINE=1" in err
    assert "PACKER=/path/to/packer ./setup.sh" in err and "on PATH" in err            # a packer you have
    assert "apt-get install packer" in err                                            # a distribution's package
    assert "signed-by=/usr/share/keyrings/hashicorp-archive-keyring.gpg" in err and FINGERPRINT in err
    assert "SHA256SUMS" in err and "SHA256SUMS.sig" in err                            # the release zip
    assert "E: " not in err, "an apt error instead of the message"
    assert not any("install" in c for c in _commands(res.stdout)), "it installed something"
    assert not (script.parent / ".venv").exists()


@NETNS
def test_dry_run_prints_the_hashicorp_repository_commands(tmp_path: Path):
    script = _copy(tmp_path)
    res = _setup(script, env={"IMAGEPIPE_SETUP_DRY_RUN": "1", "PATH": _path_without_packer(tmp_path),
                              "APT_CONFIG": _apt_without_packer(tmp_path)}, netns=True)
    assert res.returncode == 0, res.stdout + res.stderr
    cmds = _commands(res.stdout)
    text = "\n".join(cmds)
    first_install = next(c for c in cmds if "apt-get install" in c)
    assert first_install.split()[-2:] == ["curl", "gpg"]  # what the repository's setup needs
    order = ["curl -fsSL --proto =https --tlsv1.2 -o", "gpg --batch --show-keys --with-colons",
             "gpg --batch --yes --dearmor", "install -m 0644", "/usr/share/keyrings/hashicorp-archive-keyring.gpg",
             "/etc/apt/sources.list.d/hashicorp.list", "Dir::Etc::sourcelist=/etc/apt/sources.list.d/hashicorp.list",
             "install -y -qq --no-install-recommends packer"]
    positions = [text.find(piece) for piece in order]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), list(zip(order, positions, strict=True))
    assert "https://apt.releases.hashicorp.com/gpg" in text
    codename = subprocess.run(["sh", "-c", ". /etc/os-release && echo $VERSION_CODENAME"], capture_output=True,
                              text=True).stdout.strip()
    repo = f"signed-by=/usr/share/keyrings/hashicorp-archive-keyring.gpg] https://apt.releases.hashicorp.com {codename} main"
    assert repo in res.stdout
    assert FINGERPRINT in res.stdout
    assert not (script.parent / ".venv").exists()


def test_help_and_unknown_arguments(tmp_path: Path):
    script = _copy(tmp_path)
    res = _setup(script, "--help", env={})
    assert res.returncode == 0 and "IMAGEPIPE_OFFLINE=1" in res.stdout and "--dry-run" in res.stdout
    res = _setup(script, "--bogus", env={})
    assert res.returncode == 2 and "unknown argument '--bogus'" in res.stderr


def test_the_scripts_are_shellcheck_clean():
    shellcheck = require_tool("shellcheck", "shellcheck")
    scripts = [ROOT / "setup.sh", *sorted((ROOT / ".ci").iterdir())]
    scripts += [p for p in (ROOT / "tests").glob("run") if p.is_file()]
    res = subprocess.run([shellcheck, *map(str, scripts)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
