# imagepipe's NixOS images.
#
# Every file params/<image>.json (written by `invoke render` from invoke.yaml; committed) becomes
#   nixosConfigurations.<image>                 the NixOS system of that image
#   packages.<arch>-linux.<image>-image         its qcow2 disk, built by nixpkgs' make-disk-image.nix
# e.g. nixosConfigurations.nixos-x86_64 and packages.x86_64-linux.nixos-x86_64-image.
#
# The flake is pure: everything it reads is tracked in git or an input, so it never needs --impure.
# Disk images are built inside a Linux VM, so a package can only be built on a Linux host of the same
# architecture with the `kvm` system feature (imagepipe checks this before it calls nix build).
#
# nixpkgs is pinned through flake.lock, which nix writes (never by hand): create or refresh it with
# `invoke update-flake` (`nix flake update` here) on a machine with network access, then commit it.
{
  description = "imagepipe: NixOS VM images (qcow2) from make-disk-image.nix";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";

  outputs =
    { self, nixpkgs }:
    let
      lib = nixpkgs.lib;
      linuxSystems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      allSystems = linuxSystems ++ [
        "x86_64-darwin"
        "aarch64-darwin"
      ];

      # params/*.json -> { <image name> = <params>; }
      paramFiles = lib.filterAttrs (
        file: type: type == "regular" && lib.hasSuffix ".json" file
      ) (builtins.readDir ./params);
      images = lib.mapAttrs' (
        file: _:
        let
          params = builtins.fromJSON (builtins.readFile (./params + "/${file}"));
        in
        lib.nameValuePair params.name params
      ) paramFiles;

      # The modules every image is made of; they read `params` from specialArgs.
      imageModules = [
        self.nixosModules.base
        self.nixosModules.qemu-guest
        self.nixosModules.disk
        self.nixosModules.cloud-init
      ];

      mkSystem =
        params:
        lib.nixosSystem {
          specialArgs = { inherit params; };
          modules = imageModules ++ [ { nixpkgs.hostPlatform = params.system; } ];
        };

      mkImage =
        name: params:
        let
          nixos = self.nixosConfigurations.${name};
        in
        import "${nixpkgs}/nixos/lib/make-disk-image.nix" {
          inherit lib;
          inherit (nixos) pkgs config;
          name = "${name}-image";
          format = params.format;
          diskSize = params.disk_size;
          # efi on UEFI images (GPT + ESP), legacy (MBR, GRUB in the MBR) on BIOS images; the
          # boot loader settings in modules/disk.nix follow the same parameter.
          partitionTableType = params.partition_table;
          # No nixpkgs channel copy inside the image: smaller, faster, and the flake is the source.
          copyChannel = false;
        };

      imagesFor = system: lib.filterAttrs (_: params: params.system == system) images;

      pkgsFor =
        system:
        import nixpkgs {
          inherit system;
          # Packer is BSL-licensed (unfree in nixpkgs); allow exactly that package for the shell.
          config.allowUnfreePredicate = pkg: lib.getName pkg == "packer";
        };

      # Python libraries imagepipe imports; ones a nixpkgs release lacks come from pip (see shellHook).
      pythonDeps = [
        "invoke"
        "fabric"
        "paramiko"
        "jinja2"
        "python-hcl2"
        "pyyaml"
        "rich"
        "pytest"
        "pykickstart"
      ];
    in
    {
      # The image modules read `params` (same keys as params/*.json) from specialArgs.
      nixosModules = {
        base = ./modules/base.nix;
        qemu-guest = ./modules/qemu-guest.nix;
        disk = ./modules/disk.nix;
        cloud-init = ./modules/cloud-init.nix;
        # For the machines that run these images: libvirtd + QEMU, users in libvirtd and kvm.
        vm-host = ./modules/vm-host.nix;
      };

      nixosConfigurations = lib.mapAttrs (_: mkSystem) images;

      packages = lib.genAttrs linuxSystems (
        system: lib.mapAttrs' (name: params: lib.nameValuePair "${name}-image" (mkImage name params)) (imagesFor system)
      );

      devShells = lib.genAttrs allSystems (
        system:
        let
          pkgs = pkgsFor system;
          available = builtins.filter (dep: pkgs.python3Packages ? ${dep}) pythonDeps;
          missing = builtins.filter (dep: !(pkgs.python3Packages ? ${dep})) pythonDeps;
        in
        {
          default = pkgs.mkShell {
            packages = [
              pkgs.packer
              pkgs.qemu
              pkgs.rsync
              pkgs.openssh
              pkgs.xorriso
              (pkgs.python3.withPackages (ps: map (dep: ps.${dep}) available))
            ];
            # The aarch64 UEFI code of this QEMU, which imagepipe uses when no firmware
            # descriptor matches (as the original tooling exported it).
            QEMU_EFI_AARCH64 = "${pkgs.qemu}/share/qemu/edk2-aarch64-code.fd";
            shellHook = lib.optionalString (missing != [ ]) ''
              echo "imagepipe: not in this nixpkgs, install with pip: ${lib.concatStringsSep " " missing}" >&2
            '';
          };
        }
      );

      # nixfmt (RFC 166 style) over the whole tree; `nixfmt-rfc-style` is only a deprecated alias
      # of nixfmt since 25.11.
      formatter = lib.genAttrs allSystems (system: nixpkgs.legacyPackages.${system}.nixfmt-tree);
    };
}
