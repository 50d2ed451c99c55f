import pytest

from pipeline.base.errors import AccelUnavailable, HostUnsuitable
from pipeline.host import HostFacts, KvmFacts
from pipeline.model import Accel, Arch
from pipeline.plan import choose_accel

KVM_OK = KvmFacts(True, True, True)
NO_VMX = KvmFacts(True, True, False)          # this CI machine
NO_DEV = KvmFacts(False, False, None)
DENIED = KvmFacts(True, False, True, "Permission denied")


def facts(os="linux", machine="x86_64", kvm=KVM_OK, hvf=False):
    return HostFacts(os=os, machine=machine, kvm=kvm, hvf=hvf)


@pytest.mark.parametrize("f,guest,want,reason", [
    (facts(), Arch.X86_64, Accel.KVM, "read-write"),
    (facts(kvm=NO_VMX), Arch.X86_64, Accel.TCG, "no vmx/svm"),
    (facts(kvm=NO_DEV), Arch.X86_64, Accel.TCG, "does not exist"),
    (facts(kvm=DENIED), Arch.X86_64, Accel.TCG, "group kvm"),
    (facts("darwin", "arm64", NO_DEV, True), Arch.AARCH64, Accel.HVF, "hv_support"),
    (facts("darwin", "arm64", NO_DEV, False), Arch.AARCH64, Accel.TCG, "hv_support is not 1"),
    (facts(), Arch.AARCH64, Accel.TCG, "emulating"),
    (facts(machine="aarch64", kvm=KvmFacts(True, True, None)), Arch.AARCH64, Accel.KVM, "read-write"),
])
def test_auto(f, guest, want, reason):
    choice = choose_accel(Accel.AUTO, f, guest)
    assert choice.accel is want
    assert reason in choice.reason
    assert choice.fallback == (want is Accel.TCG)
    assert choice.cpu_model == ("max" if want is Accel.TCG else "host")


@pytest.mark.parametrize("req,f,guest,msg", [
    (Accel.KVM, facts(kvm=NO_VMX), Arch.X86_64, "no vmx/svm"),
    (Accel.KVM, facts("darwin", "arm64", NO_DEV, True), Arch.AARCH64, "Linux-only"),
    (Accel.KVM, facts(), Arch.AARCH64, "cannot run this guest"),
    (Accel.HVF, facts(), Arch.X86_64, "HVF is not available"),
    (Accel.HVF, facts("darwin", "arm64", NO_DEV, True), Arch.X86_64, "cannot run this guest"),
])
def test_explicit_requests_that_cannot_be_met(req, f, guest, msg):
    with pytest.raises(AccelUnavailable) as exc:
        choose_accel(req, f, guest)
    assert msg in exc.value.message and exc.value.hint


def test_explicit_tcg_always_works():
    assert choose_accel(Accel.TCG, facts(), Arch.AARCH64).accel is Accel.TCG


def test_foreign_arch_build_needs_an_explicit_tcg():
    with pytest.raises(HostUnsuitable) as exc:
        choose_accel(Accel.AUTO, facts(), Arch.AARCH64, purpose="build")
    assert "--accel tcg" in exc.value.hint and "remote" in exc.value.hint
    assert choose_accel(Accel.TCG, facts(), Arch.AARCH64, purpose="build").accel is Accel.TCG
