"""Faults and bad input through the real CLI (issue 25, part 4): one clear line, exit != 0,
nothing written where it does not belong."""

from tests.support import ROOT, invoke


def test_hash_password_refuses_a_password_with_a_line_break(tmp_path):
    for secret, what in (("one\ntwo", "a line break"), ("one\rtwo", "a carriage return")):
        res = invoke(["hash-password", "--password", secret], timeout=60)
        assert res.returncode == 2, (res.stdout, res.stderr)
        assert f"the password contains {what}" in res.stderr and "$6$" not in res.stdout
        assert "Traceback" not in res.stderr
    res = invoke(["hash-password", "--password", "fine"], timeout=60, check=True)
    assert res.stdout.count("$6$") == 1 and len(res.stdout.strip().splitlines()) == 1


def test_invoke_project_root_cannot_move_where_render_writes(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    res = invoke(["render"], env={"INVOKE_PROJECT_ROOT": str(elsewhere)}, timeout=120)
    assert res.returncode == 2 and "INVOKE_PROJECT_ROOT" in res.stderr and "tasks.py" in res.stderr
    assert not elsewhere.exists()
    res = invoke(["render"], timeout=120, check=True)  # the project itself: nothing to change
    assert "up to date" in res.stderr
    assert (ROOT / "packer").is_dir()
