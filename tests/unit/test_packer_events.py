from pipeline.drivers.packer import build_argv, parse_machine_line
from pipeline.render.packer import supports_plugins


def test_step_lines_become_steps():
    ev = parse_machine_line("1700000000,,ui,say,==> qemu.demo: Waiting for SSH to become available...")
    assert ev.kind == "step" and ev.message == "Waiting for SSH to become available..." and ev.ts == 1700000000


def test_commas_are_unescaped_and_errors_kept():
    ev = parse_machine_line("1700000001,,ui,error,Build 'x' errored: a%!(PACKER_COMMA) b")
    assert ev.kind == "error" and ev.message == "Build 'x' errored: a, b"


def test_message_prefix_is_dropped():
    ev = parse_machine_line("1700000002,,ui,message,    qemu.demo: mke2fs 1.47")
    assert ev.kind == "message" and ev.message == "mke2fs 1.47"


def test_artifact_and_noise():
    ev = parse_machine_line("1700000003,demo,artifact,0,file,0,/out/demo.qcow2")
    assert ev.kind == "artifact" and ev.data[-1] == "/out/demo.qcow2"
    assert parse_machine_line("1700000004,,ui,say,") is None
    assert parse_machine_line("1700000004,demo,artifact-count,1") is None


def test_build_argv_passes_every_variable_and_the_template_last():
    argv = build_argv("t.pkr.hcl", {"b": "2", "accelerator": "tcg"}, on_error="abort")
    assert argv[:5] == ["packer", "build", "-machine-readable", "-force", "-on-error=abort"]
    assert argv[5:9] == ["-var", "accelerator=tcg", "-var", "b=2"] and argv[-1] == "t.pkr.hcl"


def test_plugins_only_from_1_7():
    assert not supports_plugins((1, 6)) and supports_plugins((1, 7)) and supports_plugins((1, 11))
    assert not supports_plugins(None)
