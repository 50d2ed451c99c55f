"""pipeline.base.events: one JSON record shape, written and read back in one place."""

import io
import json

import pytest

from pipeline import rebuild
from pipeline.base import events
from pipeline.base.events import Event
from pipeline.progress import Progress


def test_record_shape_and_round_trip():
    ev = Event("artifact", "built", source="packer", ts=12.5, data=("0", "id", "x"), fields={"build_id": "b1"})
    record = events.to_record(ev, "demo", elapsed=3.14159)
    assert record == {"image": "demo", "kind": "artifact", "message": "built", "source": "packer", "ts": 12.5,
                      "elapsed": 3.142, "data": ["0", "id", "x"], "build_id": "b1"}
    assert events.parse(events.dumps(ev, "demo")) == ("demo", ev)


def test_named_fields_cannot_shadow_the_record():
    record = events.to_record(Event("built", "ok", fields={"kind": "failed", "image": "x", "sha256": "ab"}), "demo")
    assert record["kind"] == "built" and record["image"] == "demo" and record["sha256"] == "ab"


@pytest.mark.parametrize("line,image,kind,message,source,data,fields", [
    # what older builders print: progress lines (data list, elapsed) ...
    ('{"image": "demo", "elapsed": 1.2, "kind": "step", "message": "m", "source": "packer", "ts": 5, "data": []}',
     "demo", "step", "m", "packer", (), {}),
    # ... rebuild lines (no source, named fields at the top level) and the old skipped line
    ('{"image": "demo", "kind": "built", "message": "m", "ts": 5, "build_id": "b1", "sha256": "ab"}',
     "demo", "built", "m", "", (), {"build_id": "b1", "sha256": "ab"}),
    ('{"image": "demo", "kind": "skipped", "message": "up to date", "ts": 5}', "demo", "skipped", "up to date", "", (), {}),
    ('{"kind": "note", "message": "m", "data": ["a", 1], "ts": null}', "", "note", "m", "", ("a", "1"), {}),
])
def test_parse_reads_old_and_new_lines(line, image, kind, message, source, data, fields):
    got = events.parse(line)
    assert got is not None
    name, ev = got
    assert (name, ev.kind, ev.message, ev.source, ev.data, dict(ev.fields)) == (image, kind, message, source, data, fields)
    assert ev.ts > 0


@pytest.mark.parametrize("line", ["", "==> qemu: Waiting for SSH", "[1, 2]", '{"message": "no kind"}', "{broken"])
def test_parse_ignores_other_lines(line):
    assert events.parse(line) is None


def test_every_writer_uses_the_schema(capsys):
    with Progress("demo", json_lines=True, stream=io.StringIO()) as p:
        p.step_event("verify")
    rebuild.make_emitter(True)("summary", "*", "1 built", built=1)
    lines = capsys.readouterr().out.splitlines()
    progress_line, summary = (json.loads(line) for line in lines)
    assert set(events.CORE_KEYS) <= set(progress_line) and progress_line["source"] == "imagepipe"
    assert set(events.CORE_KEYS) - {"elapsed"} <= set(summary) and summary["built"] == 1
    assert all(events.parse(line) is not None for line in lines)
