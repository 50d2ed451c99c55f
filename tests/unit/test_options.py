"""pipeline.tasks.options: --accel and whole-number options, parsed in one place."""


import pytest
import yaml

from pipeline.base.errors import UsageError
from pipeline.config import load
from pipeline.model import Accel
from pipeline.tasks.options import accel_option, parse_accel, remote_accel_option, whole_number
from tests.support import ROOT


def config(accel: str | None = None):
    raw = yaml.safe_load((ROOT / "invoke.yaml").read_text())
    if accel is not None:
        raw["defaults"]["accel"] = accel
    return load(raw, ROOT)


@pytest.mark.parametrize("text,want", [("kvm", Accel.KVM), ("TCG", Accel.TCG), (" hvf ", Accel.HVF),
                                       ("auto", Accel.AUTO), ("", None)])
def test_parse_accel(text, want):
    assert parse_accel(text) is want


def test_bad_accel_is_one_line_with_a_suggestion():
    with pytest.raises(UsageError) as exc:
        parse_accel("kvn")
    assert exc.value.message == "--accel: expected one of auto, kvm, hvf, tcg, got 'kvn' (did you mean 'kvm'?)"
    assert exc.value.exit_code == 2


def test_local_tasks_fall_back_to_defaults_accel():
    assert accel_option("", config("kvm")) is Accel.KVM
    assert accel_option("", config()) is Accel.AUTO
    assert accel_option("tcg", config("kvm")) is Accel.TCG  # the option wins over invoke.yaml


def test_remote_tasks_send_only_an_explicit_accel():
    assert remote_accel_option("") is None  # the builder's own defaults.accel applies there
    assert remote_accel_option("KVM") == "kvm"
    with pytest.raises(UsageError):
        remote_accel_option("fast")


def test_whole_number():
    assert whole_number("0", "--limit") == 0 and whole_number("42", "--timeout") == 42 and whole_number(7, "-n") == 7
    # one strict parser (pipeline.base.numbers): ASCII digits only, no spaces, signs, exponents, huge values
    for bad in ("x", "-1", "1.5", "", " 42", "42 ", "²", "٣", "1e3", "+5", "1_000", "9" * 25, "1000001"):
        with pytest.raises(UsageError, match="--limit expects a whole number"):
            whole_number(bad, "--limit")
