# File systems and boot loader matching make-disk-image.nix's layout for `partition_table`:
#   legacy: MBR, one ext4 root labelled "nixos", GRUB in the MBR (BIOS boot)
#   efi:    GPT, a vfat ESP labelled "ESP" on /boot and the ext4 root (UEFI boot)
# The root partition and file system grow to the disk at first boot, so a resized qcow2 just works.
#
# Reads `params` (see base.nix for the naming convention).
{ lib, params, ... }:
let
  efi = params.partition_table == "efi";
in
{
  fileSystems."/" = {
    device = "/dev/disk/by-label/nixos";
    fsType = "ext4";
    autoResize = true;
  };
  fileSystems."/boot" = lib.mkIf efi {
    device = "/dev/disk/by-label/ESP";
    fsType = "vfat";
  };

  boot.growPartition = true;
  boot.loader.timeout = lib.mkDefault 1;
  boot.loader.grub = lib.mkMerge [
    { enable = true; }
    # GRUB's menu on the serial console as well, so a headless boot can be followed (x86_64;
    # on aarch64 UEFI, GRUB's EFI console already is the serial console).
    (lib.mkIf (params.arch == "x86_64") {
      extraConfig = ''
        serial --unit=0 --speed=115200
        terminal_input serial console
        terminal_output serial console
      '';
    })
    (lib.mkIf efi {
      device = "nodev";
      efiSupport = true;
      # Install to the removable path (EFI/BOOT/BOOT*.EFI): a fresh OVMF/AAVMF vars file finds it
      # without NVRAM boot entries.
      efiInstallAsRemovable = true;
    })
    (lib.mkIf (!efi) { device = "/dev/vda"; })
  ];
}
