"""Property tests (Hypothesis) for the parsers and validators that read text imagepipe does not
control: Packer's machine-readable lines, builder event lines, nix's log, numbers, manifests,
rsync statistics and the configuration. They never raise, and what they accept is sane."""

from __future__ import annotations

import json
import string
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.base import events
from pipeline.base.errors import ConfigError, NumberError
from pipeline.base.numbers import parse_decimal, parse_int
from pipeline.base.text import has_control, visible
from pipeline.base.validate import output_dir_problem
from pipeline.builders import rsync
from pipeline.config import IMAGE_SPEC, load
from pipeline.drivers.nixlog import LogParser
from pipeline.drivers.packer import parse_machine_line
from pipeline.output import manifest_check

PROPS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# text with the characters that cause trouble: controls, escapes, C1, bidi overrides, digits of
# other scripts, separators
NASTY = st.lists(st.sampled_from(
    list(string.printable) + ["\x1b", "\x00", "\x07", "\x9b", "\u202e", "\u2028", "²", "٣", ",", "%!(PACKER_COMMA)"]
)).map("".join)
ANY_TEXT = st.one_of(st.text(), NASTY)
JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | ANY_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ANY_TEXT, inner, max_size=4),
    max_leaves=20,
)


def clean(text: str) -> bool:
    return not has_control(text.replace("\t", " "))


# ------------------------------------------------------------------------------ text


@PROPS
@given(ANY_TEXT)
def test_visible_leaves_no_control_character_and_keeps_printable_text(text):
    shown = visible(text)
    assert clean(shown)
    if all(c in string.printable and c not in "\n\r\x0b\x0c" for c in text):
        assert shown == text


# ------------------------------------------------------------------------------ numbers


@PROPS
@given(ANY_TEXT)
def test_parse_int_accepts_ascii_digits_only(text):
    try:
        value = parse_int(text)
    except NumberError:
        assert not (text.isascii() and text.isdigit() and 0 < len(text) <= 18)
    else:
        assert text.isascii() and text.isdigit() and value == int(text)


@PROPS
@given(st.integers(), st.integers(min_value=0, max_value=10**6), st.integers(min_value=0, max_value=10**6))
def test_parse_int_bounds(value, lo, span):
    hi = lo + span
    try:
        assert lo <= parse_int(value, lo=lo, hi=hi) <= hi
    except NumberError:
        assert not lo <= value <= hi


@PROPS
@given(st.one_of(ANY_TEXT, st.floats(allow_nan=True, allow_infinity=True), st.integers()))
def test_parse_decimal_is_finite_and_bounded(value):
    try:
        number = parse_decimal(value, hi=1e12)
    except NumberError:
        return
    assert 0 <= number <= 1e12


# ------------------------------------------------------------------------------ tool output


@PROPS
@given(ANY_TEXT)
def test_packer_line_parser_never_raises_and_shows_no_control_characters(line):
    ev = parse_machine_line(line)
    assert ev is None or (clean(ev.message.replace("\n", " ")) and isinstance(ev.ts, float) and ev.ts < 2**36)


@PROPS
@given(st.integers(min_value=0, max_value=2**34), ANY_TEXT, st.sampled_from(["ui", "artifact", "error", "x"]),
       st.lists(ANY_TEXT, max_size=4))
def test_packer_machine_lines_with_hostile_fields(ts, target, kind, data):
    ev = parse_machine_line(",".join([str(ts), target.replace(",", ""), kind, *data]))
    assert ev is None or clean(ev.message.replace("\n", " "))


@PROPS
@given(ANY_TEXT)
def test_event_parser_never_raises_on_text(line):
    parsed = events.parse(line)
    assert parsed is None or isinstance(parsed[1].ts, float)


@PROPS
@given(JSONISH)
def test_event_parser_never_raises_on_any_json(value):
    try:
        line = json.dumps(value)
    except (ValueError, TypeError):
        return
    parsed = events.parse(line)
    if parsed is not None:
        image, ev = parsed
        assert isinstance(image, str) and isinstance(ev.message, str) and isinstance(ev.kind, str)
        assert 0 <= ev.ts < 2**36


@PROPS
@given(st.sampled_from(["step", "say", "done"]), ANY_TEXT, ANY_TEXT, st.floats(min_value=0, max_value=2**34))
def test_event_round_trip(kind, message, image, ts):
    ev = events.Event(kind, message, "imagepipe", ts)
    parsed = events.parse(events.dumps(ev, image, elapsed=1.0))
    assert parsed is not None
    assert parsed[0] == image and parsed[1].message == message and parsed[1].kind == kind


@PROPS
@given(st.one_of(ANY_TEXT, JSONISH.map(lambda v: "@nix " + json.dumps(v, default=str))))
def test_nix_log_parser_never_raises(line):
    ev = LogParser().feed(line)
    assert ev is None or clean(ev.message.replace("\n", " "))


@PROPS
@given(ANY_TEXT)
def test_rsync_stats_parser_never_raises(text):
    stats = rsync.parse_stats(text)
    assert all(v >= 0 for v in (stats.files, stats.sent, stats.received, stats.literal))


# ------------------------------------------------------------------------------ state files


@PROPS
@given(JSONISH)
def test_manifest_check_never_raises_and_accepts_only_plain_names(data):
    found = manifest_check.problems(data)
    if not found:
        assert manifest_check.plain_name(data["artifact"]["file"]) and "/" not in data["artifact"]["file"]


# ------------------------------------------------------------------------------ configuration

VALUES = st.one_of(JSONISH, st.sampled_from(["10\n", "a\x1b[2J", "x" * 70, "9" * 25, "²", "٣", "1e3", " 5"]))


@PROPS
@given(st.sampled_from(sorted(IMAGE_SPEC)), VALUES)
def test_config_validation_never_raises_anything_but_config_error(key, value):
    raw = {"images": {"demo-x86_64": {"distro": "demo", "arch": "x86_64", key: value}}}
    try:
        cfg = load(raw, root=Path("/srv/project"))
    except ConfigError as exc:
        assert exc.problems and all(clean(p) for p in exc.problems)
        return
    accepted = getattr(cfg.images["demo-x86_64"], key, None)
    if isinstance(accepted, str):
        assert clean(accepted)


@PROPS
@given(st.dictionaries(st.sampled_from(["accel", "output_dir", "retention", "ssh_key", "schedule", "lang",
                                        "headless", "bogus"]), VALUES, max_size=4),
       st.dictionaries(ANY_TEXT, JSONISH, max_size=2))
def test_defaults_and_builders_never_crash_validation(defaults, builders):
    raw = {"defaults": defaults, "builders": builders,
           "images": {"demo-x86_64": {"distro": "demo", "arch": "x86_64"}}}
    try:
        cfg = load(raw, root=Path("/srv/project"))
    except ConfigError as exc:
        assert all(clean(p) for p in exc.problems)
        return
    assert output_dir_problem(cfg.output_dir, Path("/srv/project")) is None


@PROPS
@given(ANY_TEXT)
def test_output_dir_check_never_raises(text):
    if "\x00" in text:
        return  # not a path the OS can hold
    problem = output_dir_problem(Path("/srv/project") / text, Path("/srv/project"), home=Path("/home/u"))
    assert problem is None or isinstance(problem, str)
