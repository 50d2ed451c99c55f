"""The command line as people meet it, through real `invoke` processes: help everywhere, a
left-out IMAGE/HOST, unknown tasks and options, Invoke's own --dry, one meaning per short flag."""

from __future__ import annotations

from collections import defaultdict

import pytest

from pipeline.tasks import cli, collection
from tests.support import invoke, write_config

IMAGES = ("almalinux10-aarch64", "almalinux10-x86_64", "demo-x86_64", "nixos-aarch64", "nixos-x86_64")


@pytest.fixture()
def cfg(tmp_path):
    return write_config(tmp_path / "c.yaml", tmp_path / "out")


@pytest.mark.parametrize("args", [["build", "--help"], ["build", "-h"], ["build", "demo-x86_64", "-h"],
                                  ["remote-sync-build", "-h"], ["remote-build-nixos-x86", "--help"],
                                  ["remote-fetch", "hal9000", "-h"], ["--help", "stop"]])
def test_help_always_shows_help(args, cfg, tmp_path):
    res = invoke(args, cfg)
    assert res.returncode == 0, res.stderr
    task = next(a for a in args if not a.startswith("-"))
    assert res.stdout.startswith(f"Usage: inv[oke] [--core-opts] {task} ") and "Options:" in res.stdout
    assert res.stderr == "" and not (tmp_path / "out").exists()  # help never starts anything


def test_help_shows_placeholders_not_kinds(cfg):
    text = invoke(["history", "--help"], cfg).stdout + invoke(["stop", "--help"], cfg).stdout
    assert "-l N, --limit=N" in text and "-t SECONDS, --timeout=SECONDS" in text
    assert "-i IMAGE, --image=IMAGE" in text and "STRING" not in text and "INT" not in text
    assert "Usage: invoke stop NAME [--options]" in text  # the positional is named in the help


@pytest.mark.parametrize("args,missing,listed", [
    (["build"], "IMAGE", IMAGES), (["ssh"], "NAME", ("instances: none yet",)),
    (["stop", "--force"], "NAME", ("instances: none yet",)),
    (["remote-sync-build"], "HOST", ("hal9000",)), (["remote-fetch", "hal9000"], "IMAGE", IMAGES)])
def test_left_out_positional_gives_usage_and_choices(args, missing, listed, cfg):
    res = invoke(args, cfg)
    assert res.returncode == 2, res.stderr
    assert f"error: invoke {args[0]} needs {missing}" in res.stderr
    assert f"usage: invoke {args[0]} " in res.stderr and all(name in res.stderr for name in listed)
    assert "Traceback" not in res.stderr


def test_unknown_image_lists_the_configured_ones(cfg):
    res = invoke(["run", "demo"], cfg)
    assert res.returncode == 2 and "unknown image 'demo'" in res.stderr and "demo-x86_64" in res.stderr


def test_unknown_task_suggests_close_names(cfg):
    res = invoke(["buidl", "demo-x86_64"], cfg)
    assert res.returncode == 2
    assert "no task called 'buidl'. Did you mean: build" in res.stderr and "invoke --list" in res.stderr
    res = invoke(["status-all"], cfg)
    assert res.returncode == 2 and "Did you mean: status" in res.stderr


def test_unknown_option_suggests_the_tasks_own(cfg, tmp_path):
    res = invoke(["build", "demo-x86_64", "--dyr-run"], cfg)
    assert res.returncode == 2
    assert "'--dyr-run' is not an option of 'invoke build'; did you mean --dry-run?" in res.stderr
    assert not (tmp_path / "out").exists()


def test_invokes_own_dry_never_starts_a_build(cfg, tmp_path):
    for args in (["build", "demo-x86_64", "--dry"], ["build-demo", "--dry"], ["--dry", "build-demo"]):
        res = invoke(args, cfg, timeout=60)
        assert res.returncode == 2, res.stderr
        assert "--dry is Invoke's own flag" in res.stderr and "invoke build" in res.stderr
        assert "--dry-run" in res.stderr
    assert not (tmp_path / "out").exists()  # nothing probed, locked, keyed or built


def test_number_options_need_a_number(cfg):
    res = invoke(["history", "--limit"], cfg)
    assert res.returncode == 2 and res.stderr.strip() == "error: --limit needs a value (N)"
    res = invoke(["history", "-l", "2x"], cfg)
    # the message names the accepted range (pipeline/tasks/options.py: whole_number's hi bound)
    assert res.returncode == 2 and "--limit expects a whole number (0 to 1000000), got '2x'" in res.stderr


def test_one_meaning_per_short_flag_across_every_task():
    """Walk every task's options through the Collection: a letter names one long option only,
    `-h` is nobody's, and every short flag is the project-wide one."""
    meanings: dict[str, set[str]] = defaultdict(set)
    for ctx in collection().to_contexts():
        for arg in ctx.args.values():
            longs = [n for n in arg.names if len(n) > 1]
            shorts = [n for n in arg.names if len(n) == 1]
            assert len(longs) == 1, (ctx.name, arg.names)
            for letter in shorts:
                meanings[letter].add(longs[0])
                assert cli.SHORT_FLAGS.get(arg.name) == letter, (ctx.name, arg.names)
    clashes = {letter: names for letter, names in meanings.items() if len(names) > 1}
    assert not clashes, f"short flags with two meanings: {clashes}"
    assert "h" not in meanings and meanings["f"] == {"force"} and meanings["a"] == {"accel"}


def test_number_options_are_typed_in_every_task():
    for ctx in collection().to_contexts():
        for arg in ctx.args.values():
            if arg.name in cli.NUMBERS:
                assert arg.kind is int and isinstance(arg, cli.ImagepipeArgument) and arg.number, ctx.name
                assert arg.metavar in ("N", "SECONDS"), (ctx.name, arg.metavar)


def test_parser_hooks_are_installed():
    collection()
    assert cli.installed()


def test_not_built_foreign_arch_points_to_a_builder_not_a_refused_build(cfg):
    res = invoke(["run-nixos-arm"], cfg)
    assert res.returncode == 2, res.stderr
    assert "nixos-aarch64 has not been built yet" in res.stderr
    assert "invoke build nixos-aarch64" not in res.stderr  # this x86_64 host refuses that build
    assert "invoke remote-sync-build HOST --image nixos-aarch64 && invoke remote-fetch HOST nixos-aarch64" in res.stderr
    res = invoke(["run-nixos-x86"], cfg)
    assert res.returncode == 2 and "build it first: invoke build nixos-x86_64" in res.stderr


def test_every_tasks_help_names_values_by_meaning():
    """In every task's --help (Invoke's own help_tuples, as `invoke TASK --help` prints them) a value
    is shown as IMAGE, HOST, N, SECONDS...; never as Invoke's STRING or INT, and every value option
    shows one (also the repeatable ones, which Invoke would show as bare flags)."""
    import re

    for ctx in collection().to_contexts():
        for spec, _help in ctx.help_tuples():
            assert "STRING" not in spec and not re.search(r"\bINT\b", spec), (ctx.name, spec)
        for arg in ctx.args.values():
            if arg.takes_value:
                spec, _ = ctx.help_for("--" + arg.name.replace("_", "-"))
                assert f"={arg.metavar}" in spec, (ctx.name, spec)
