# Running under QEMU: virtio drivers, the serial console, the QEMU guest agent.
#
# Reads `params` (see base.nix for the naming convention).
{ modulesPath, params, ... }:
{
  imports = [ (modulesPath + "/profiles/qemu-guest.nix") ];

  # The serial console is last so that it becomes /dev/console: imagepipe captures boot logs
  # from it (ttyS0 on x86_64, ttyAMA0 on aarch64).
  boot.kernelParams = [
    "console=tty0"
    "console=${params.console},115200n8"
  ];

  services.qemuGuest.enable = true;

  # Shown above the login prompt on every console.
  services.getty.helpLine = ''
    imagepipe image ${params.name}: when imagepipe runs it, log in from the host with
    ssh -p ${toString params.ssh_port} ${params.ssh_user}@127.0.0.1
  '';
}
