"""The local probe answers its fixed questions in-process (pipeline.host.in_process_runner): the
answers must read the same as the real commands' output does, through the same parsers, on the
machine the suite runs on."""

from __future__ import annotations

import sys

from pipeline import host
from pipeline.base.run import Result


def _both(argv: tuple[str, ...]) -> tuple[Result, Result]:
    return host.in_process_runner(argv), host.local_runner(argv)


def test_uname_and_cpuinfo_read_as_the_commands_do():
    mine, real = _both(("uname", "-sm"))
    assert host.parse_uname(mine.stdout) == host.parse_uname(real.stdout)
    _os, machine = host.parse_uname(real.stdout)
    mine, real = _both(("cat", "/proc/cpuinfo"))
    assert mine.ok == real.ok
    assert host.parse_cpu_flags(mine.stdout, machine) == host.parse_cpu_flags(real.stdout, machine)
    assert host.parse_cpu_virt(mine.stdout, machine) == host.parse_cpu_virt(real.stdout, machine)


def test_kvm_open_answers_as_the_python_snippet_does():
    mine, real = _both((sys.executable, "-c", host.KVM_SNIPPET))
    assert host.parse_kvm_open(mine.stdout) == host.parse_kvm_open(real.stdout)


def test_free_disk_reads_as_df_does(tmp_path):
    mine, real = _both(("df", "-Pk", str(tmp_path)))
    free_mine, free_real = host.parse_df(mine.stdout), host.parse_df(real.stdout)
    assert free_mine is not None and free_real is not None
    # the same filesystem: other processes write meanwhile, so within 64 MiB, not to the byte
    assert abs(free_mine - free_real) < 64 * 1024**2


def test_a_missing_file_fails_like_cat_and_other_commands_still_run(tmp_path):
    missing = tmp_path / "machines"
    mine, real = _both(("cat", "--", str(missing)))
    assert not mine.ok and not real.ok
    res = host.in_process_runner(("true",))
    assert res.ok  # anything else goes to the real command


def test_package_manager_is_found_as_the_shell_finds_it(tmp_path, monkeypatch):
    mine, real = _both(host.MANAGER_ARGV)
    assert host.parse_package_manager("linux", mine.stdout) == host.parse_package_manager("linux", real.stdout)
    for name in ("dnf", "nix-env"):  # two of them on a PATH of our own
        (tmp_path / name).write_text("#!/bin/sh\n")
        (tmp_path / name).chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    mine = host.in_process_runner(host.MANAGER_ARGV)
    # every one found, in the order asked (bash's `command -v`; dash's reads only its first name)
    assert mine.ok and mine.stdout == f"{tmp_path}/dnf\n{tmp_path}/nix-env\n"
    assert host.parse_package_manager("linux", mine.stdout) == "dnf"
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert not host.in_process_runner(host.MANAGER_ARGV).ok
