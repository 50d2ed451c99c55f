import io
import json

from pipeline.progress import Event, Progress


def test_plain_lines_off_a_tty():
    out = io.StringIO()
    with Progress("demo", stream=out) as p:
        assert p.live_enabled is False
        p.emit(Event("step", "Waiting for SSH", ts=0))
        p.emit(Event("message", "mke2fs done", ts=0))
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "==> Waiting for SSH" in lines[0] and lines[1].endswith("mke2fs done")
    assert p.steps == 1 and p.step == "Waiting for SSH" and p.last == "mke2fs done"


def test_json_lines_on_stdout(capsys):
    with Progress("demo", json_lines=True) as p:
        p.emit(Event("error", "boom", source="packer", ts=1.5))
    record = json.loads(capsys.readouterr().out)
    assert record["image"] == "demo" and record["kind"] == "error" and record["message"] == "boom"


def test_live_view_renders_step_and_last_message():
    out = io.StringIO()
    p = Progress("demo", stream=out, live=True)
    with p:
        p.emit(Event("step", "Starting VM", ts=0))
        p.emit(Event("message", "booting", ts=0))
        text = p._render().plain
    assert "demo" in text and "step 1: Starting VM" in text and "booting" in text
    assert "Starting VM" in out.getvalue()  # steps stay on screen above the live line
