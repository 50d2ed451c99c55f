from pathlib import Path

from pipeline.drivers.packer import build_argv, parse_machine_line
from pipeline.render.packer import supports_plugins

RECORDED = Path(__file__).parent.parent / "fixtures" / "packer-demo-build.log"


def test_packer_step_lines_are_progress_inside_our_step():
    ev = parse_machine_line("1700000000,,ui,say,==> qemu.demo: Waiting for SSH to become available...")
    assert ev.kind == "say" and ev.message == "Waiting for SSH to become available..." and ev.ts == 1700000000
    ev = parse_machine_line("1700000000,,ui,say,\\n==> Builds finished. The artifacts of successful builds are:")
    assert ev.kind == "say" and ev.message == "Builds finished. The artifacts of successful builds are:"


def test_commas_are_unescaped_and_errors_kept():
    ev = parse_machine_line("1700000001,,ui,error,Build 'x' errored: a%!(PACKER_COMMA) b")
    assert ev.kind == "error" and ev.message == "Build 'x' errored: a, b"


def test_plugin_prefix_is_dropped_from_every_line():
    ev = parse_machine_line("1700000002,,ui,message,    qemu.demo: mke2fs 1.47")
    assert ev.kind == "message" and ev.message == "mke2fs 1.47"
    ev = parse_machine_line("1795857451,,ui,message,    qemu.demo-x86_64: The VM will be run headless%!(PACKER_COMMA)"
                            " without a GUI.\\n    qemu.demo-x86_64: view the screen\\n    qemu.demo-x86_64: vnc://x")
    assert ev.message == "The VM will be run headless, without a GUI.\nview the screen\nvnc://x"
    ev = parse_machine_line("1795857466,,ui,say,--> qemu.demo-x86_64: VM files in directory: /o")
    assert ev.message == "VM files in directory: /o"


def test_artifact_and_noise():
    ev = parse_machine_line("1700000003,demo,artifact,0,file,0,/out/demo.qcow2")
    assert ev.kind == "artifact" and ev.data[-1] == "/out/demo.qcow2"
    assert parse_machine_line("1700000004,,ui,say,") is None
    assert parse_machine_line("1700000004,demo,artifact-count,1") is None
    assert parse_machine_line("1795857451,,ui,say,Warning: A checksum of 'none' was specified. Since ISO") is None


def test_a_recorded_build_shows_no_bookkeeping():
    """Every line of a real `packer build -machine-readable` of the demo image (Packer 1.6.6):
    nothing people see carries a build-name prefix or an artifact field."""
    shown = [ev for ev in map(parse_machine_line, RECORDED.read_text().splitlines()) if ev and ev.kind != "artifact"]
    text = "\n".join(ev.message for ev in shown)
    assert "Connected to SSH!" in text and "Gracefully halting virtual machine..." in text
    for noise in ("qemu.demo-x86_64:", "builder-id", "files-count", "transcend.qemu", "%!(PACKER_COMMA)"):
        assert noise not in text, noise
    assert not any(line.strip() == "end" for line in text.splitlines())


def test_build_argv_passes_every_variable_and_the_template_last():
    argv = build_argv("t.pkr.hcl", {"b": "2", "accelerator": "tcg"}, on_error="abort")
    assert argv[:5] == ["packer", "build", "-machine-readable", "-force", "-on-error=abort"]
    assert argv[5:9] == ["-var", "accelerator=tcg", "-var", "b=2"] and argv[-1] == "t.pkr.hcl"


def test_plugins_only_from_1_7():
    assert not supports_plugins((1, 6)) and supports_plugins((1, 7)) and supports_plugins((1, 11))
    assert not supports_plugins(None)
