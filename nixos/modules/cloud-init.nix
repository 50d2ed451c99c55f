# cloud-init for imagepipe's instances: it reads an instance's NoCloud seed (a disk labelled
# cidata: its hostname, the user's SSH keys, shared folders mounted by the seed's boot script,
# and --user-data) and nothing else: it never probes cloud metadata addresses. The network stays
# NixOS's own (networking.*). On by default (`"cloud_init": true` in the params); turn it off
# with `imagepipe.cloudInit.enable = false` in your own flake.
#
# Reads `params` (see base.nix for the naming convention).
{ config, lib, params, ... }:
{
  options.imagepipe.cloudInit.enable = lib.mkOption {
    type = lib.types.bool;
    default = params.cloud_init;
    description = "Run cloud-init at boot, reading an instance's NoCloud seed (hostname, SSH keys, user-data).";
  };

  config = lib.mkIf config.imagepipe.cloudInit.enable {
    services.cloud-init.enable = true;
    services.cloud-init.network.enable = false;
    services.cloud-init.settings.datasource_list = [ "NoCloud" "None" ];
  };
}
