# Accounts, sudo, SSH and locale of an imagepipe image.
#
# Reads `params` (params/<image>.json, from specialArgs). Conventions the project's tests check
# mechanically: `params.<key>` is a top-level key of the JSON, `user.<key>` a key of one entry of
# `params.users`.
{ lib, params, ... }:
let
  hasPassword = user: user.password_hash != null;

  account =
    user:
    lib.nameValuePair user.name (
      {
        # Only SHA-512 crypt hashes reach this file; null locks password login for the account.
        hashedPassword = user.password_hash;
        openssh.authorizedKeys.keys = user.public_keys;
      }
      // lib.optionalAttrs (user.name != "root") {
        isNormalUser = true;
        extraGroups = lib.optional user.sudo "wheel";
      }
    );

  # A sudo user without a password could never type one: let exactly those run sudo without it.
  passwordlessSudo = builtins.filter (user: user.sudo && !(hasPassword user)) params.users;
in
{
  networking.hostName = params.hostname;
  time.timeZone = params.timezone;
  i18n.defaultLocale = params.lang;
  console.keyMap = params.keyboard;

  # Accounts come from the configuration only: what invoke.yaml says is what the image has.
  users.mutableUsers = false;
  users.users = builtins.listToAttrs (map account params.users);

  security.sudo.enable = true;
  security.sudo.wheelNeedsPassword = lib.mkDefault true;
  security.sudo.extraRules = map (user: {
    users = [ user.name ];
    commands = [
      {
        command = "ALL";
        options = [ "NOPASSWD" ];
      }
    ];
  }) passwordlessSudo;

  services.openssh = {
    enable = true;
    openFirewall = true;
    settings = {
      # Password login only when some account has a password at all; root only with a key.
      PasswordAuthentication = lib.mkDefault (builtins.any hasPassword params.users);
      KbdInteractiveAuthentication = false;
      PermitRootLogin = lib.mkDefault "prohibit-password";
    };
  };

  nix.settings.experimental-features = [
    "nix-command"
    "flakes"
  ];

  system.stateVersion = params.state_version;
}
