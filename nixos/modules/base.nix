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

  # Every sudo user runs sudo without a password, as on the AlmaLinux images (the kickstart's
  # sudoers.d drop-in): imagepipe's boot test and rebuilds run `sudo -n` over SSH.
  sudoUsers = builtins.filter (user: user.sudo) params.users;

  # Root logs in over SSH with its password only when the image asks for it (`root_ssh`);
  # otherwise with a key only. Images rendered before the parameter existed get the default.
  rootSsh = params.root_ssh or false;
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
  }) sudoUsers;

  services.openssh = {
    enable = true;
    openFirewall = true;
    settings = {
      # Password login only when some account has a password at all.
      PasswordAuthentication = lib.mkDefault (builtins.any hasPassword params.users);
      KbdInteractiveAuthentication = false;
      PermitRootLogin = lib.mkDefault (if rootSsh then "yes" else "prohibit-password");
    };
  };

  nix.settings.experimental-features = [
    "nix-command"
    "flakes"
  ];

  system.stateVersion = params.state_version;
}
