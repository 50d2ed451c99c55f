#!/usr/bin/env bash
# imagepipe quick start on Debian/Ubuntu: system packages, a .venv with imagepipe, then the
# offline demo build (a real packer build, no ISO download). Safe to run again.
#   ./setup.sh              everything, then `invoke build-demo`
#   ./setup.sh --no-build   install only
set -euo pipefail
cd "$(dirname "$0")"

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

PACKAGES=(
  packer qemu-system-x86 qemu-system-arm qemu-efi-aarch64 qemu-utils ovmf xorriso
  openssh-server openssh-client rsync sshpass nix-bin e2fsprogs systemd openssl shellcheck
  python3 python3-venv python3-pip ca-certificates dpkg apt-utils tmux
)

echo "==> installing system packages: ${PACKAGES[*]}"
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}"

echo "==> creating .venv with imagepipe and its test extras"
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
# An editable install leaves the project's own modules uncompiled; Python writes their bytecode on
# first use, unless the environment forbids it (PYTHONDONTWRITEBYTECODE), when every `invoke`
# would compile ~100 modules again (0.1-0.3 s). Compile them now; a stale .pyc is never used.
.venv/bin/python -m compileall -q pipeline tasks.py >/dev/null

if [ "${1:-}" != "--no-build" ]; then
  echo "==> building the offline demo image (invoke build-demo)"
  .venv/bin/invoke build-demo
  echo
  echo "Done. Next: .venv/bin/invoke --list   (or activate: . .venv/bin/activate)"
fi
