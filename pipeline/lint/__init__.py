"""The checks of `invoke lint` over the generated files: the check registry (checks.py) and the nix checks (nix.py)."""
