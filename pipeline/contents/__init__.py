"""What an image holds: its packages (rpm, deb, nix), the CycloneDX SBOM, and the diff of two builds."""
