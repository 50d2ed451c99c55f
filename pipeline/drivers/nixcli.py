"""How imagepipe calls nix: the new command line with flakes enabled for each call only (a
user's nix.conf is never changed). Used by the nix driver, nix's remote builds and lint."""

from __future__ import annotations

FEATURES = ("--extra-experimental-features", "nix-command flakes")


def nix_argv(*args: str) -> list[str]:
    """argv of a nix (new CLI) command with flakes enabled for this call only."""
    return ["nix", *FEATURES, *args]
