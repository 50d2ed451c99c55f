# For the NixOS machines that run or build imagepipe images: libvirtd with QEMU and UEFI
# firmware, the `kvm` system feature make-disk-image needs, and group membership for the users
# named in `imagepipe.vmHost.users`.
#
# Usage in a host's flake:  modules = [ imagepipe.nixosModules.vm-host
#                                       { imagepipe.vmHost.users = [ "alice" ]; } ];
{ config, lib, pkgs, ... }:
let
  cfg = config.imagepipe.vmHost;
in
{
  options.imagepipe.vmHost.users = lib.mkOption {
    type = lib.types.listOf lib.types.str;
    default = [ ];
    example = [ "alice" ];
    description = "Users allowed to run VMs (added to the libvirtd and kvm groups).";
  };

  config = {
    virtualisation.libvirtd = {
      enable = true;
      qemu = {
        package = pkgs.qemu_kvm;
        runAsRoot = false;
        swtpm.enable = true;
        ovmf = {
          enable = true;
          packages = [ pkgs.OVMF.fd ];
        };
      };
    };

    environment.systemPackages = [
      pkgs.qemu
      pkgs.OVMF.fd
    ];

    # Building NixOS disk images runs a VM inside the Nix build: nix must advertise `kvm`.
    nix.settings.system-features = [
      "kvm"
      "nixos-test"
      "big-parallel"
      "benchmark"
    ];

    users.users = lib.genAttrs cfg.users (_: {
      extraGroups = [
        "libvirtd"
        "kvm"
      ];
    });
  };
}
