import io
import json
import re
import time

from pipeline.progress import Event, Progress, console_last_line, transfer_text

ESC = "\x1b["


def test_plain_lines_off_a_tty_count_steps_and_carry_no_colour():
    out = io.StringIO()
    with Progress("demo", stream=out, total=3) as p:
        assert p.live_enabled is False
        p.emit(Event("step", "packer build", ts=0))
        p.emit(Event("say", "Waiting for SSH", ts=0))
        p.emit(Event("message", "mke2fs done", ts=0))
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and "==> [1/3] packer build" in lines[0]
    assert lines[1].endswith("Waiting for SSH") and lines[2].endswith("mke2fs done")
    assert ESC not in out.getvalue()
    assert p.steps == 1 and p.step == "packer build" and p.last == "mke2fs done"


def test_artifact_bookkeeping_is_never_shown_or_logged(tmp_path):
    out, log = io.StringIO(), tmp_path / "build.log"
    with Progress("demo", stream=out, log_path=log) as p:
        p.emit(Event("artifact", "builder-id transcend.qemu", ts=0))
        p.emit(Event("say", "Connected to SSH!", ts=0))
    assert "builder-id" not in out.getvalue() and "builder-id" not in log.read_text()
    assert "Connected to SSH!" in out.getvalue()


def test_readable_log_has_date_time_and_text(tmp_path):
    log = tmp_path / "logs" / "b1" / "build.log"
    with Progress("demo", stream=io.StringIO(), log_path=log, total=2) as p:
        p.log_only("imagepipe 0.1.0: build b1 of demo")
        p.emit(Event("step", "packer build"))
        p.emit(Event("error", "Build 'x' errored: boom"))
    lines = log.read_text().splitlines()
    stamp = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \+\s*\d+\.\ds "
    assert all(re.match(stamp, line) for line in lines), lines
    assert lines[0].endswith("imagepipe 0.1.0: build b1 of demo")
    assert lines[1].endswith("==> [1/2] packer build") and lines[2].endswith("!!  Build 'x' errored: boom")


def test_json_lines_on_stdout_with_step_numbers(capsys):
    with Progress("demo", json_lines=True, total=4) as p:
        p.emit(Event("step", "verify", source="imagepipe", ts=1.5))
        p.emit(Event("error", "boom", source="packer", ts=1.5))
    first, second = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert first["kind"] == "step" and first["step"] == 1 and first["total"] == 4
    assert second["image"] == "demo" and second["kind"] == "error" and second["message"] == "boom"


def test_a_remote_builders_step_numbers_are_kept():
    out = io.StringIO()
    with Progress("demo", stream=out, prefix="[hal9000] ", heartbeat=0) as p:
        p.emit(Event("step", "verify", fields={"step": 4, "total": 5}, ts=0))
    assert "[hal9000] " in out.getvalue() and "==> [4/5] verify" in out.getvalue()


def test_heartbeat_during_a_quiet_step_shows_elapsed_and_console(tmp_path):
    console = tmp_path / "console.log"
    console.write_bytes(b"\x1b[0mBooting\r\n\x1b[1;32mlogin: \x1b[0m\r\n\r\n")
    out = io.StringIO()
    with Progress("demo", stream=out, console_log=console, heartbeat=1.0, total=3) as p:
        p.emit(Event("step", "packer build", ts=0))
        deadline = time.monotonic() + 10
        while "still in" not in out.getvalue() and time.monotonic() < deadline:
            time.sleep(0.1)
    beat = next(line for line in out.getvalue().splitlines() if "still in" in line)
    assert "still in [1/3] packer build: 0:00:0" in beat and beat.endswith("console: login:")


def test_console_last_line_is_printable(tmp_path):
    path = tmp_path / "c.log"
    assert console_last_line(path) == ""
    path.write_bytes(b"a\n\x1b[2J\x1b[Hb\x07\x00c\r\n  \n")
    assert console_last_line(path) == "bc"


def test_live_view_renders_step_total_elapsed_and_console(tmp_path):
    console = tmp_path / "console.log"
    console.write_text("Welcome to imagepipe\n")
    out = io.StringIO()
    p = Progress("demo", stream=out, live=True, total=5, console_log=console)
    with p:
        p.emit(Event("step", "Starting VM", ts=0))
        p.emit(Event("message", "booting", ts=0))
        text = p._render().plain
    assert "demo" in text and "[1/5] Starting VM" in text and "0:00:0" in text
    assert "console: Welcome to imagepipe" in text
    assert "Starting VM" in out.getvalue()  # steps stay on screen above the live line


def test_downloads_show_bytes_speed_and_eta():
    mib = 1024**2
    assert transfer_text("x.iso", 312 * mib, 900 * mib, 12 * mib) == \
        "downloading x.iso: 312.0 of 900.0 MiB (34%), 12.0 MiB/s, ETA 0:00:49"
    assert transfer_text("x.iso", 5 * mib, None, mib, resumed_at=2 * mib) == \
        "downloading x.iso: 5.0 MiB, 1.0 MiB/s, resumed at 2.0 MiB"
    assert transfer_text("x.iso", 900 * mib, 900 * mib, 10 * mib, final=True) == "downloaded x.iso: 900.0 MiB at 10.0 MiB/s"


def test_plain_downloads_are_throttled():
    out = io.StringIO()
    with Progress("demo", stream=out, heartbeat=0) as p:
        for done in range(100):
            p.transfer("x.iso", done * 1024**2, 100 * 1024**2, 1024**2)
        p.transfer("x.iso", 100 * 1024**2, 100 * 1024**2, 1024**2, final=True)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "downloading x.iso: 0.0 of 100.0 MiB" in lines[0] and "downloaded" in lines[1]


def test_a_reader_that_goes_away_does_not_stop_the_build(tmp_path):
    """`invoke build ... 2>&1 | head -3`: once the pipe is closed, the build goes on (its log too)."""
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone
    stream = os.fdopen(write_end, "w")
    log = tmp_path / "build.log"
    with Progress("demo", stream=stream, log_path=log, heartbeat=0, total=2) as p:
        p.emit(Event("step", "packer build"))
        p.emit(Event("say", "still going"))
        p.emit(Event("step", "verify"))
    assert "==> [2/2] verify" in log.read_text()
    stream.close()
