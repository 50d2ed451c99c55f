# For the NixOS machines that run or build imagepipe images: libvirtd with QEMU (whose edk2
# UEFI firmware and descriptors, share/qemu/firmware, libvirt now uses by default) and group
# membership for the users named in `imagepipe.vmHost.users`.
#
# Nix's `kvm` system feature, which make-disk-image needs, is already in NixOS's default
# nix.settings.system-features (nixos/modules/config/nix.nix, with nixos-test, benchmark,
# big-parallel and the gccarch-* of the host): this module leaves that setting alone.
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
        # No `ovmf` here: nixpkgs removed that submodule (25.11) and setting it now fails an
        # assertion; the firmware shipped with QEMU is available by default.
      };
    };

    # libvirtd.nix asserts that polkit is on (it authorizes the libvirtd group).
    security.polkit.enable = true;

    # qemu-system-* for imagepipe itself; its share/qemu/firmware descriptors point at the
    # edk2 (OVMF/AAVMF) images QEMU ships.
    environment.systemPackages = [ pkgs.qemu ];

    users.users = lib.genAttrs cfg.users (_: {
      extraGroups = [
        "libvirtd"
        "kvm"
      ];
    });
  };
}
