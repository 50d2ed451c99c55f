"""A fetch's progress lines: what is in the staging folder, against the manifest's sizes, read
from a file that really grows (as rsync --inplace grows it)."""

from __future__ import annotations

import time

from pipeline import fetch
from pipeline.base.units import MIB


def wait_for(lines: list[str], text: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [line for line in lines if text in line]
        if found:
            return found[-1]
        time.sleep(0.01)
    raise AssertionError(f"no line with {text!r} in {lines}")


def test_lines_follow_the_file_as_it_grows(tmp_path):
    lines: list[str] = []
    image = tmp_path / "demo.qcow2"
    with fetch._progress(tmp_path, {"demo.qcow2": 10 * MIB}, lines.append, every=0.05), open(image, "wb") as f:
        f.write(bytes(int(2.5 * MIB)))
        f.flush()
        first = wait_for(lines, "(25%)")
        f.write(bytes(int(3.5 * MIB)))
        f.flush()
        later = wait_for(lines, "(60%)")
    assert first.startswith("downloading demo.qcow2: 2.5 of 10.0 MiB (25%)"), first
    assert later.startswith("downloading demo.qcow2: 6.0 of 10.0 MiB (60%)") and "MiB/s" in later, later
    assert "resumed" not in later
    count = len(lines)
    time.sleep(0.2)
    assert len(lines) == count  # the reporter ended with the block


def test_a_resumed_transfer_says_where_it_resumed_and_counts_several_files(tmp_path):
    (tmp_path / "a.qcow2").write_bytes(bytes(4 * MIB))
    lines: list[str] = []
    with fetch._progress(tmp_path, {"a.qcow2": 4 * MIB, "b.raw": 4 * MIB}, lines.append, every=0.05):
        line = wait_for(lines, "downloading")
    assert line.startswith("downloading 2 image files: 4.0 of 8.0 MiB (50%)") and "resumed at 4.0 MiB" in line, line


def test_a_short_transfer_prints_nothing(tmp_path):
    lines: list[str] = []
    with fetch._progress(tmp_path, {"demo.qcow2": MIB}, lines.append, every=5.0):
        (tmp_path / "demo.qcow2").write_bytes(bytes(MIB))
    assert lines == []
