"""The local rsync's probe: `rsync --version` of real rsyncs (3.2.7, 3.5.0, 3.5.1, run on Debian)
and recorded outputs of macOS's (openrsync, 2.6.9): see tests/fixtures/rsync/README.md."""

import pytest

from pipeline.builders import rsync
from tests.support import ROOT

FIXTURES = ROOT / "tests" / "fixtures" / "rsync"


@pytest.mark.parametrize("name, version, protocol", [
    ("rsync-3.2.7.txt", (3, 2, 7), 32), ("rsync-3.5.0.txt", (3, 5, 0), 32), ("rsync-3.5.1.txt", (3, 5, 1), 33),
])
def test_current_rsyncs_are_read_and_accepted(name, version, protocol):
    found = rsync.parse_version((FIXTURES / name).read_text())
    assert (found.flavor, found.version, found.protocol) == ("rsync", version, protocol)
    assert found.compress == ("zstd", "lz4", "zlibx", "zlib") and found.named  # its "Compress list"
    assert rsync.version_problem(found) is None


def test_openrsync_is_told_apart_although_it_claims_2_6_9():
    found = rsync.parse_version((FIXTURES / "openrsync.txt").read_text())
    assert found.flavor == "openrsync" and found.protocol == 29
    problem = rsync.version_problem(found)
    assert problem and "openrsync" in problem and "--protect-args" in problem and "--append-verify" in problem


def test_macos_2_6_9_is_refused_with_what_it_lacks():
    found = rsync.parse_version((FIXTURES / "rsync-2.6.9.txt").read_text())
    assert found == rsync.RsyncVersion("rsync", (2, 6, 9), 29, ("zlib",))  # -z only, no --compress-choice
    problem = rsync.version_problem(found)
    assert problem and "rsync 2.6.9" in problem and "3.1.0 or later" in problem


def test_unreadable_output_is_refused_not_guessed():
    assert rsync.version_problem(rsync.parse_version("")) is not None
    assert rsync.version_problem(rsync.parse_version("something else 9.9\n")) is not None


def test_the_hint_fits_the_host():
    assert "brew install rsync" in rsync.upgrade_hint("brew") and "nix develop" in rsync.upgrade_hint("brew")
    assert "nix develop" in rsync.upgrade_hint("nix")
    assert rsync.upgrade_hint("apt") == "sudo apt-get install rsync"
    assert "brew install rsync" in rsync.upgrade_hint(None)


def test_every_flag_imagepipe_passes_is_one_the_minimum_version_has():
    """What the version check guards: the flags of both directions (see MIN_VERSION)."""
    push = rsync.push_argv(ROOT, "h", "/d", None)
    pull = rsync.pull_argv("h", ["/s"], ROOT, None, resume=True)
    delta = rsync.pull_argv("h", ["/s"], ROOT, None, basis=ROOT)
    flags = {a.split("=")[0] for a in push + pull + delta if a.startswith("--")}
    assert flags <= {"--recursive", "--links", "--perms", "--times", "--delete", "--stats", "--protect-args",
                     "--exclude", "--filter", "--inplace", "--append-verify", "--whole-file", "--out-format",
                     "--no-whole-file", "--ignore-times", "--copy-dest"}, flags
    # compression: -z (zlib) for any rsync; naming the compressor only where both ends are 3.2+
    assert rsync.compress_args("zlib", named=False) == ["--compress"]
    assert rsync.compress_args("zstd", 3)[1:] == ["--compress-choice=zstd", "--compress-level=3"]
