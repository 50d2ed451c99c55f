"""NixOS images' generated files, where the generic renderer looks for them.

`invoke render` collects each image's files from `pipeline.render.<distro>.files`; for NixOS
that is the params JSON written by pipeline.render.nix (the flake itself is hand-written).
"""

from pipeline.render.nix import files

__all__ = ["files"]
