# Optional cloud-init, off by default: images are configured at build time from invoke.yaml.
# Turn it on for clouds that hand out users and keys through a metadata service, either with
# `"cloud_init": true` in the params or `imagepipe.cloudInit.enable = true` in your own flake.
#
# Reads `params` (see base.nix for the naming convention).
{ config, lib, params, ... }:
{
  options.imagepipe.cloudInit.enable = lib.mkOption {
    type = lib.types.bool;
    default = params.cloud_init;
    description = "Run cloud-init at boot (users, keys and network from the cloud's metadata).";
  };

  config = lib.mkIf config.imagepipe.cloudInit.enable {
    services.cloud-init.enable = true;
    services.cloud-init.network.enable = true;
  };
}
