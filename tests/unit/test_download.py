"""download.open_url looks the host up before any TLS set-up: offline fails at once, proxies are left alone."""

from __future__ import annotations

import socket
import ssl
import urllib.error
import urllib.parse

import pytest

from pipeline import download

PROXY_VARS = ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY",
              "no_proxy", "NO_PROXY")


def test_unresolvable_host_fails_before_a_tls_context_is_built(monkeypatch):
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)

    def no_tls(*_a: object, **_k: object) -> None:
        raise AssertionError("a TLS context was built for a host that does not resolve")

    monkeypatch.setattr(ssl, "create_default_context", no_tls)
    # RFC 6761: names under .invalid never resolve, online or not
    with pytest.raises(urllib.error.URLError) as err:
        download.open_url("https://mirror.example.invalid/almalinux/10/isos/x86_64/CHECKSUM", timeout=5)
    assert isinstance(err.value.reason, socket.gaierror)
    assert download.reason(err.value)  # the one-line reason the pin refresh reports


def test_a_proxy_resolves_names_itself(monkeypatch):
    looked_up: list[str] = []
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *_a, **_k: looked_up.append(host) or [])
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    download._resolvable(urllib.parse.urlsplit("https://mirror.example.invalid/x"))
    assert looked_up == []
    monkeypatch.delenv("https_proxy")
    download._resolvable(urllib.parse.urlsplit("https://mirror.example.invalid/x"))
    assert looked_up == ["mirror.example.invalid"]
