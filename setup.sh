#!/usr/bin/env bash
# imagepipe quick start on Debian/Ubuntu: system packages, Packer, a .venv with imagepipe, then
# the offline demo build (a real packer build, no ISO download). Safe to run again.
#   ./setup.sh              everything, then `invoke build-demo`
#   ./setup.sh --no-build   install only
#   ./setup.sh --dry-run    print the commands it would run, run none, contact nothing
#                           (also: IMAGEPIPE_SETUP_DRY_RUN=1)
# Packer, in this order:
#   PACKER=/path/to/packer  that binary, as it is (linked into .venv/bin for later invoke runs)
#   a packer on PATH        (or in .venv/bin from an earlier run) used as it is
#   the distribution's      `apt-get install packer` where the release packages it (Debian 12)
#   HashiCorp's apt repo    elsewhere (Debian 13 and later): its key, checked against its
#                           published fingerprint, as a `signed-by` keyring; then apt-get install
# IMAGEPIPE_OFFLINE=1: only what is installed and the distribution's own packages; without a
# packer it stops and names each way to get one, before contacting anything.
set -euo pipefail
cd "$(dirname "$0")"
export CHECKPOINT_DISABLE=1  # `packer version` would otherwise ask HashiCorp's checkpoint service

BUILD=1
DRY_RUN="${IMAGEPIPE_SETUP_DRY_RUN:-0}"
OFFLINE="${IMAGEPIPE_OFFLINE:-0}"
for arg in "$@"; do
  case "$arg" in
    --no-build) BUILD=0 ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,16s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) echo "error: unknown argument '$arg' (see ./setup.sh --help)" >&2; exit 2 ;;
  esac
done
[ "$DRY_RUN" = 1 ] || DRY_RUN=0
[ "$OFFLINE" = 1 ] || OFFLINE=0

SUDO=()
if [ "$(id -u)" -ne 0 ]; then SUDO=(sudo); fi
APT=("${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get)

PACKAGES=(
  qemu-system-x86 qemu-system-arm qemu-efi-aarch64 qemu-utils ovmf xorriso
  openssh-server openssh-client rsync sshpass nix-bin e2fsprogs systemd openssl shellcheck iproute2
  python3 python3-venv python3-pip ca-certificates dpkg apt-utils tmux mmdebstrap gpg gpgv
  arch-test debian-archive-keyring fdisk mtools dosfstools util-linux coreutils qemu-user-static
)

# HashiCorp's apt repository and the fingerprint of the key that signs it (HashiCorp publishes
# it on its security page; the key downloaded from the repository must carry it).
HASHICORP_APT=https://apt.releases.hashicorp.com
HASHICORP_FINGERPRINT=798AEC654E5C15428C8E42EEAA16FCBCA621E701
HASHICORP_KEYRING=/usr/share/keyrings/hashicorp-archive-keyring.gpg
HASHICORP_LIST=/etc/apt/sources.list.d/hashicorp.list
HASHICORP_RELEASE_FINGERPRINT=C874011F0AB405110D02105534365D9472D7468F  # signs the release zips' SHA256SUMS

# Print a command as it runs (shell-quoted); in a dry run, only print it.
run() {
  printf '+'; printf ' %q' "$@"; printf '\n'
  [ "$DRY_RUN" = 1 ] || "$@"
}

say() { echo "==> $*"; }

# shellcheck source=/dev/null
codename() { (. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}"); }

# Every way to get Packer, after why none was found; exit 1.
no_packer() {
  local release
  # shellcheck source=/dev/null
  release="$(. /etc/os-release 2>/dev/null && echo "${PRETTY_NAME:-this system}" || echo "this system")"
  cat >&2 <<EOF
error: imagepipe needs Packer and found none: $1.
Get Packer one of these ways, then run ./setup.sh again:
  - a packer you already have: put it on PATH, or run  PACKER=/path/to/packer ./setup.sh
  - the distribution's package where the release has one (Debian 12: apt-get install packer);
    $release has none
  - HashiCorp's apt repository (what ./setup.sh sets up without IMAGEPIPE_OFFLINE=1): the key
    $HASHICORP_APT/gpg, checked to have the fingerprint
    $HASHICORP_FINGERPRINT, stored with gpg --dearmor as
    $HASHICORP_KEYRING; then the line
      deb [signed-by=$HASHICORP_KEYRING] $HASHICORP_APT $(codename) main
    in $HASHICORP_LIST, apt-get update, apt-get install packer
  - HashiCorp's release zip (https://releases.hashicorp.com/packer/VERSION/): check it against
    packer_VERSION_SHA256SUMS, that file against its signature packer_VERSION_SHA256SUMS.sig
    (HashiCorp's release key, fingerprint $HASHICORP_RELEASE_FINGERPRINT),
    then unzip the packer binary into a folder on PATH
EOF
  exit 1
}

# The packer the project would run: PACKER, else PATH, else .venv/bin (a link an earlier run made).
find_packer() {
  if [ -n "${PACKER:-}" ]; then
    if [ ! -f "$PACKER" ] || [ ! -x "$PACKER" ]; then
      echo "error: PACKER=$PACKER is not an executable file: point PACKER at the packer binary, or unset it" >&2
      exit 2
    fi
    PACKER_FROM="PACKER"; PACKER_BIN="$(cd "$(dirname "$PACKER")" && pwd)/$(basename "$PACKER")"
  elif PACKER_BIN="$(command -v packer)"; then
    PACKER_FROM="PATH"
  elif [ -x .venv/bin/packer ]; then
    PACKER_FROM=".venv/bin"; PACKER_BIN="$PWD/.venv/bin/packer"
  else
    return 1
  fi
}

# apt's candidate for the packer package ("" or "(none)": the package lists have none).
packer_candidate() { LC_ALL=C apt-cache policy packer 2>/dev/null | sed -n 's/^ *Candidate: //p' | head -n 1; }

lists_present() {
  local lists=""
  eval "$(apt-config shell lists Dir::State::Lists/d)"
  compgen -G "${lists:-/var/lib/apt/lists/}*_Packages*" >/dev/null
}

# HashiCorp's apt repository: key, fingerprint check, signed-by source, then the package.
hashicorp_repo() {
  local tmp arch release fpr line
  release="$(codename)"
  arch="$(dpkg --print-architecture)"
  [ -n "$release" ] || { echo "error: /etc/os-release names no VERSION_CODENAME" >&2; return 1; }
  if [ "$DRY_RUN" = 1 ]; then tmp="${TMPDIR:-/tmp}/imagepipe-setup.XXXXXX"; else tmp="$(mktemp -d)"; fi
  line="deb [arch=$arch signed-by=$HASHICORP_KEYRING] $HASHICORP_APT $release main"
  run curl -fsSL --proto =https --tlsv1.2 -o "$tmp/hashicorp.asc" "$HASHICORP_APT/gpg" || return 1
  echo "# the key must be exactly one key with fingerprint $HASHICORP_FINGERPRINT:"
  run env GNUPGHOME="$tmp" gpg --batch --show-keys --with-colons "$tmp/hashicorp.asc"
  if [ "$DRY_RUN" = 0 ]; then
    fpr="$(GNUPGHOME="$tmp" gpg --batch --show-keys --with-colons "$tmp/hashicorp.asc" |
           awk -F: '$1 == "pub" { n++ } $1 == "fpr" && !seen { print $10; seen = 1 } END { if (n != 1) print "count:" n }')"
    if [ "$fpr" != "$HASHICORP_FINGERPRINT" ]; then
      echo "error: the key from $HASHICORP_APT/gpg is not HashiCorp's (fingerprint: ${fpr:-none}); nothing was installed" >&2
      rm -rf "$tmp"; return 1
    fi
  fi
  run env GNUPGHOME="$tmp" gpg --batch --yes --dearmor -o "$tmp/hashicorp.gpg" "$tmp/hashicorp.asc" || return 1
  echo "# $tmp/hashicorp.list: $line"
  [ "$DRY_RUN" = 1 ] || printf '%s\n' "$line" > "$tmp/hashicorp.list"
  run "${SUDO[@]}" install -m 0644 "$tmp/hashicorp.gpg" "$HASHICORP_KEYRING" || return 1
  run "${SUDO[@]}" install -m 0644 "$tmp/hashicorp.list" "$HASHICORP_LIST" || return 1
  [ "$DRY_RUN" = 1 ] || rm -rf "$tmp"
  # only HashiCorp's list: the distribution's were updated just before
  run "${APT[@]}" update -qq -o Dir::Etc::sourcelist="$HASHICORP_LIST" -o Dir::Etc::sourceparts=- \
    -o APT::Get::List-Cleanup=0 || return 1
  run "${APT[@]}" install -y -qq --no-install-recommends packer
}

# A failed HashiCorp setup leaves no source behind that would break every later apt-get update
# (only what this run added: a list or keyring that was there before stays).
undo_hashicorp() {
  [ "$DRY_RUN" = 1 ] && return 0
  local f
  for f in "${HASHICORP_NEW[@]}"; do "${SUDO[@]}" rm -f "$f" || true; done
}

[ "$DRY_RUN" = 0 ] || echo "# dry run: the commands ./setup.sh would run; nothing runs, nothing is contacted"
[ "$OFFLINE" = 0 ] || echo "# IMAGEPIPE_OFFLINE=1: only what is installed and the distribution's own packages"

UPDATED=0
PACKER_WAY=""
if find_packer; then
  PACKER_WAY="given"
  say "packer: $PACKER_BIN (from $PACKER_FROM), $("$PACKER_BIN" version 2>&1 | head -n 1)"
else
  if ! lists_present && [ "$DRY_RUN" = 0 ]; then
    say "updating the distribution's package lists (they are empty)"
    run "${APT[@]}" update -qq
    UPDATED=1
  fi
  candidate="$(packer_candidate)"
  if [ -n "$candidate" ] && [ "$candidate" != "(none)" ]; then
    PACKER_WAY="distribution"
    PACKAGES+=(packer)
    say "packer: none installed; the distribution's package packer $candidate will be"
  elif [ "$OFFLINE" = 1 ]; then
    no_packer "none on PATH or in PACKER, the distribution's package lists have no packer package, and IMAGEPIPE_OFFLINE=1 rules out HashiCorp's repository"
  else
    PACKER_WAY="hashicorp"
    PACKAGES+=(curl gpg)
    say "packer: none installed and the distribution has no package: HashiCorp's apt repository will be set up"
  fi
fi

say "installing system packages: ${PACKAGES[*]}"
[ "$UPDATED" = 1 ] || run "${APT[@]}" update -qq
run "${APT[@]}" install -y -qq --no-install-recommends "${PACKAGES[@]}"

if [ "$PACKER_WAY" = hashicorp ]; then
  HASHICORP_NEW=()
  for f in "$HASHICORP_LIST" "$HASHICORP_KEYRING"; do [ -e "$f" ] || HASHICORP_NEW+=("$f"); done
  say "packer from HashiCorp's apt repository ($HASHICORP_APT, $(codename))"
  hashicorp_repo || { undo_hashicorp; no_packer "HashiCorp's apt repository could not be set up (see above)"; }
fi

say "creating .venv with imagepipe and its test extras"
[ -x .venv/bin/python ] || run python3 -m venv .venv
run .venv/bin/python -m pip install -q --upgrade pip
run .venv/bin/python -m pip install -q -e '.[test]'
# An editable install leaves the project's own modules uncompiled; Python writes their bytecode on
# first use, unless the environment forbids it (PYTHONDONTWRITEBYTECODE), when every `invoke`
# would compile ~100 modules again (0.1-0.3 s). Compile them now; a stale .pyc is never used.
run .venv/bin/python -m compileall -q pipeline tasks.py
if [ "${PACKER_FROM:-}" = PACKER ]; then
  # later `.venv/bin/invoke ...` runs find it there (imagepipe looks in PATH, then .venv/bin)
  run ln -sfn "$PACKER_BIN" .venv/bin/packer
fi

if [ "$BUILD" = 1 ]; then
  say "building the offline demo image (invoke build-demo)"
  run .venv/bin/invoke build-demo
  if [ "$DRY_RUN" = 0 ]; then
    echo
    echo "Done. Next: .venv/bin/invoke --list   (or activate: . .venv/bin/activate)"
  fi
fi
