"""The rendered-template cache (pipeline.drivers.packer.cached_dumps): the same text as a fresh
render, and never written through a link imagepipe did not make."""

from __future__ import annotations

from pipeline.drivers.packer import cached_dumps
from pipeline.render.hcl import Block, Expr, dumps


def _blocks(disk: int = 4096) -> list[Block]:
    return [Block("source", ("qemu", "demo"), {"disk_size": disk, "accelerator": Expr("var.accelerator"),
                                                "headless": True, "name": "demo"})]


def test_cached_text_is_the_fresh_render_and_keys_differ_with_the_data(tmp_path):
    cache = tmp_path / ".cache" / "render"
    first = cached_dumps(_blocks(), cache, tmp_path)
    assert first == dumps(_blocks())
    assert len(list(cache.iterdir())) == 1
    assert cached_dumps(_blocks(), cache, tmp_path) == first  # read back
    other = cached_dumps(_blocks(8192), cache, tmp_path)
    assert other == dumps(_blocks(8192)) != first
    assert len(list(cache.iterdir())) == 2


def test_a_linked_cache_folder_is_not_written_through(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "out").mkdir()
    link = tmp_path / "out" / "render"
    link.symlink_to(elsewhere)
    assert cached_dumps(_blocks(), link, tmp_path) == dumps(_blocks())
    assert list(elsewhere.iterdir()) == []


def test_a_linked_folder_above_the_cache_is_not_written_through(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / ".cache").symlink_to(elsewhere)  # planted: output/.cache -> somewhere else
    assert cached_dumps(_blocks(), out / ".cache" / "render", out) == dumps(_blocks())
    assert list(elsewhere.iterdir()) == []
