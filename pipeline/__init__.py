"""imagepipe: build, run and ship VM images with Packer, Nix and QEMU."""

__version__ = "0.1.0"
