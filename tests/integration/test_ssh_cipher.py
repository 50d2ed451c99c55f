"""The fetch's OpenSSH (its master, or rsync's own ssh beside a Fabric connection) offers AES-GCM
first on an AES CPU, unless the ssh config chose its own ciphers: checked against a real sshd,
which logs the cipher it agreed on."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.builders import openssh
from pipeline.builders.remote import Target
from tests.support.sshd import SshHost


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("cipher")
    host = SshHost(base / "sshd", extra_config=("LogLevel DEBUG1",)).start()
    known = base / "known_hosts"
    known.write_text(host.known_hosts_line())
    yield host, base, known
    host.stop()


def agreed_cipher(host: SshHost, config: Path) -> str:
    """Open a master like a fetch does, run one command, and read the cipher sshd agreed on."""
    before = host.log.read_text() if host.log.exists() else ""
    with openssh.Connection(Target("hal9000", "hal9000", "b", ssh_config=config)) as conn:
        assert conn.run(["true"]).returncode == 0
    found = re.findall(r"kex: client->server cipher: (\S+)", host.log.read_text()[len(before):])
    assert len(found) == 1, found  # one connection: the master
    return found[0]


def test_default_ciphers_get_aes_gcm_first_on_an_aes_cpu(sshd):
    host, base, known = sshd
    config = host.client_config(base / "plain_config", known)
    expected = "aes128-gcm@openssh.com" if openssh.cpu_has_aes() else "chacha20-poly1305@openssh.com"
    assert agreed_cipher(host, config) == expected


def test_a_ciphers_line_in_the_ssh_config_is_left_alone(sshd):
    host, base, known = sshd
    config = host.client_config(base / "own_config", known)
    config.write_text(config.read_text() + "  Ciphers chacha20-poly1305@openssh.com,aes128-gcm@openssh.com\n")
    assert openssh.cipher_options(Target("hal9000", "hal9000", "b", ssh_config=config), has_aes=True) == []
    assert agreed_cipher(host, config) == "chacha20-poly1305@openssh.com"


def test_cipher_options_keep_the_default_set_and_only_reorder(sshd):
    host, base, known = sshd
    config = host.client_config(base / "set_config", known)
    target = Target("hal9000", "hal9000", "b", ssh_config=config)
    assert openssh.cipher_options(target, has_aes=False) == []
    opts = openssh.cipher_options(target, has_aes=True)
    assert opts[0] == "-o" and opts[1].startswith("Ciphers=aes128-gcm@openssh.com,")
    default = openssh._ciphers(["ssh", "-F", "/dev/null", "-G", "hal9000"])
    assert default is not None
    assert sorted(opts[1].removeprefix("Ciphers=").split(",")) == sorted(default)


def test_rsync_beside_a_fabric_connection_gets_the_same_preference(sshd, tmp_path):
    """`rebuild --remote` reads the manifest over its Fabric connection and rsync opens its own
    ssh: that ssh offers AES-GCM first too."""
    from pipeline import fetch
    from pipeline.base.run import run
    from pipeline.builders import rsync

    host, base, known = sshd
    config = host.client_config(base / "rsync_config", known)
    target = Target("hal9000", "hal9000", "b", ssh_config=config)
    src = tmp_path / "file"
    src.write_bytes(b"x" * 4096)
    before = host.log.read_text()
    with fetch.link_to(object(), target) as link:  # a Fabric connection: only its runner would use it
        run(rsync.pull_argv("hal9000", [str(src)], tmp_path / "got", config, resume=False, ssh_extra=link.rsync_ssh()))
    assert (tmp_path / "got" / "file").read_bytes() == src.read_bytes()
    found = re.findall(r"kex: client->server cipher: (\S+)", host.log.read_text()[len(before):])
    assert found == ["aes128-gcm@openssh.com" if openssh.cpu_has_aes() else "chacha20-poly1305@openssh.com"]


def test_cpu_has_aes_reads_x86_flags_and_arm64_features(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu sse2 aes avx2\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd aes pmull sha1\n")
    none = tmp_path / "none"
    none.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 vaes_like\n")
    assert openssh.cpu_has_aes(x86) and openssh.cpu_has_aes(arm)
    assert not openssh.cpu_has_aes(none) and not openssh.cpu_has_aes(tmp_path / "missing")
