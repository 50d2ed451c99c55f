"""Checks over the generated files: each check is a function returning problems, so adding one
(for example `nix-instantiate --parse` of the flake) is writing a function and `register`ing it.

    @register("my-check")
    def my_check(ctx: LintContext) -> list[Problem]: ...

`run_checks` runs every registered check (a crashing check is a problem too, not a traceback)
and returns all problems; the `lint` task prints them and exits non-zero.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import distros
from pipeline.base.errors import CommandFailed, ImagepipeError
from pipeline.base.run import run, which
from pipeline.committed import drift, render_text
from pipeline.host import local_runner, probe_tools
from pipeline.lint import nix as lint_nix
from pipeline.model import Config, Image
from pipeline.render.packer import supports_plugins

PACKER_TIMEOUT = 120.0

# Arguments of `source "qemu"` in current Packer (hashicorp/packer-plugin-qemu, builder/qemu
# config.go and the packer-plugin-sdk configs it embeds). Current Packer cannot be installed
# everywhere (Debian ships 1.6.6), so the committed rendering is also checked against this list.
QEMU_PLUGIN_ARGS = frozenset({
    "http_directory", "http_content", "http_port_min", "http_port_max", "http_bind_address",
    "http_interface", "iso_checksum", "iso_url", "iso_urls", "iso_target_path", "iso_target_extension",
    "boot_keygroup_interval", "boot_wait", "boot_command", "disable_vnc", "boot_key_interval",
    "shutdown_command", "shutdown_timeout", "communicator", "pause_before_connecting", "ssh_host",
    "ssh_port", "ssh_username", "ssh_password", "ssh_keypair_name", "temporary_key_pair_name",
    "temporary_key_pair_type", "temporary_key_pair_bits", "ssh_ciphers", "ssh_clear_authorized_keys",
    "ssh_key_exchange_algorithms", "ssh_private_key_file", "ssh_certificate_file", "ssh_pty",
    "ssh_timeout", "ssh_wait_timeout", "ssh_agent_auth", "ssh_disable_agent_forwarding",
    "ssh_handshake_attempts", "ssh_bastion_host", "ssh_bastion_port", "ssh_bastion_agent_auth",
    "ssh_bastion_username", "ssh_bastion_password", "ssh_bastion_interactive",
    "ssh_bastion_private_key_file", "ssh_bastion_certificate_file", "ssh_file_transfer_method",
    "ssh_proxy_host", "ssh_proxy_port", "ssh_proxy_username", "ssh_proxy_password",
    "ssh_keep_alive_interval", "ssh_read_write_timeout", "ssh_remote_tunnels", "ssh_local_tunnels",
    "winrm_username", "winrm_password", "winrm_host", "winrm_no_proxy", "winrm_port", "winrm_timeout",
    "winrm_use_ssl", "winrm_insecure", "winrm_use_ntlm", "host_port_min", "host_port_max",
    "skip_nat_mapping", "ssh_host_port_min", "ssh_host_port_max", "floppy_files", "floppy_dirs",
    "floppy_content", "floppy_label", "cd_files", "cd_content", "cd_label", "cpus", "sockets", "cores",
    "threads", "efi_boot", "efi_firmware_code", "efi_firmware_vars", "iso_skip_cache", "accelerator",
    "disk_additional_size", "firmware", "use_pflash", "disk_interface", "disk_size", "skip_resize_disk",
    "disk_cache", "disk_discard", "disk_detect_zeroes", "skip_compaction", "disk_compression", "format",
    "headless", "disk_image", "use_backing_file", "machine_type", "memory", "net_device", "net_bridge",
    "output_directory", "qemuargs", "qemu_img_args", "qemu_binary", "qmp_enable", "qmp_socket_path",
    "use_default_display", "vga", "display", "vnc_bind_address", "vnc_use_password", "vnc_port_min",
    "vnc_port_max", "vm_name", "cdrom_interface", "vtpm", "use_tpm1", "tpm_device_type", "run_once",
})


@dataclass(frozen=True)
class Problem:
    check: str
    where: str
    message: str

    def __str__(self) -> str:
        return f"[{self.check}] {self.where}: {self.message}"


@dataclass
class LintContext:
    """What checks read: the config, what it renders (path -> text), a scratch folder."""

    cfg: Config
    files: dict[Path, str]
    scratch: Path
    notes: list[str] = field(default_factory=list)  # said to the user, not failures
    unchecked: list[str] = field(default_factory=list)  # checks that could not run here (never "clean")

    def rel(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.cfg.root))
        except ValueError:
            return str(path)

    def committed(self, suffix: str) -> list[Path]:
        return [p for p in sorted(self.files) if p.name.endswith(suffix)]

    def text(self, path: Path) -> str:
        """The committed file as users and Packer see it (the rendering when it is missing)."""
        try:
            return path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return self.files[path]


Check = Callable[[LintContext], list[Problem]]
CHECKS: dict[str, Check] = {}


def register(name: str) -> Callable[[Check], Check]:
    """Add a check under `name` (the order of registration is the order of running)."""

    def deco(fn: Check) -> Check:
        CHECKS[name] = fn
        return fn

    return deco


def run_checks(ctx: LintContext, only: list[str] | None = None) -> list[Problem]:
    """Every registered check (or `only` these); all problems, never just the first."""
    problems: list[Problem] = []
    for name, check in CHECKS.items():
        if only and name not in only:
            continue
        try:
            problems += check(ctx)
        except ImagepipeError as exc:
            problems.append(Problem(name, "-", exc.render()))
    return problems


# --------------------------------------------------------------------------------- checks


@register("drift")
def check_drift(ctx: LintContext) -> list[Problem]:
    """Committed generated files must equal what invoke.yaml renders."""
    return [Problem("drift", ctx.rel(p), "differs from what invoke.yaml renders: run invoke render") for p in drift(ctx.files)]


@register("hcl2-parse")
def check_hcl2(ctx: LintContext) -> list[Problem]:
    """Every template parses with python-hcl2."""
    import hcl2

    problems = []
    for path in ctx.committed(".pkr.hcl"):
        try:
            hcl2.loads(ctx.text(path))
        except Exception as exc:  # noqa: BLE001 (the parser raises several types)
            problems.append(Problem("hcl2-parse", ctx.rel(path), str(exc).splitlines()[0]))
    return problems


@register("qemu-arguments")
def check_qemu_arguments(ctx: LintContext) -> list[Problem]:
    """Every argument of every committed `source "qemu"` is one the current qemu plugin knows."""
    import hcl2

    problems = []
    for path in ctx.committed(".pkr.hcl"):
        try:
            doc = hcl2.loads(ctx.text(path), serialization_options=hcl2.SerializationOptions(strip_string_quotes=True))
        except Exception:  # noqa: BLE001 (a parse failure is reported by hcl2-parse)
            continue
        for block in doc.get("source", []):
            for label, body in (block.get("qemu") or {}).items():
                unknown = sorted(k for k in body if not k.startswith("__") and k not in QEMU_PLUGIN_ARGS)
                if unknown:
                    problems.append(Problem("qemu-arguments", f"{ctx.rel(path)} (source qemu.{label})",
                                            "unknown to the qemu plugin: " + ", ".join(unknown)))
    return problems


@register("kickstart")
def check_kickstart(ctx: LintContext) -> list[Problem]:
    """Every ks.cfg passes pykickstart (RHEL10 handler) and holds crypted passwords only."""
    return [Problem("kickstart", ctx.rel(p), m) for p in ctx.committed("ks.cfg") for m in kickstart_problems(ctx.text(p))]


def kickstart_problems(text: str) -> list[str]:
    """pykickstart's verdict on one kickstart text, plus the no-plaintext rule."""
    from pykickstart.errors import KickstartError, KickstartParseWarning
    from pykickstart.parser import KickstartParser
    from pykickstart.version import RHEL10, makeVersion

    handler = makeVersion(RHEL10)
    parser = KickstartParser(handler, errorsAreFatal=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", KickstartParseWarning)  # deprecated syntax fails lint
        try:
            parser.readKickstartFromString(text)
        except (KickstartError, KickstartParseWarning) as exc:
            return [" ".join(line.strip() for line in str(exc).splitlines() if line.strip())]
    out = []
    if handler.rootpw.password and not handler.rootpw.isCrypted:
        out.append("rootpw has a plaintext password")
    out += [f"user {u.name} has a plaintext password" for u in handler.user.userList if u.password and not u.isCrypted]
    return out


def packer_built(image: Image) -> bool:
    """True when Packer builds `image` (its profile renders a Packer template)."""
    return distros.profile(image).driver.name == "packer"


@register("packer-validate")
def check_packer(ctx: LintContext) -> list[Problem]:
    """`packer validate` of every Packer image's template with the installed packer."""
    images = [i for i in ctx.cfg.images.values() if packer_built(i)]
    if not images:
        return []
    info = probe_tools(local_runner, ["packer"])["packer"]
    if not info.found:
        which("packer")  # raises ToolMissing with the install hint
    legacy = not supports_plugins(info.major_minor)
    if legacy:
        ctx.notes.append(
            f"packer {info.version} predates required_plugins (1.7): validating the Packer < 1.7 rendering"
            " of each template; the committed (current Packer) rendering is checked by hcl2-parse and qemu-arguments"
        )
    problems = []
    for image in sorted(images, key=lambda i: i.name):
        problems += validate_image(ctx, image, legacy)
    return problems


def validate_image(ctx: LintContext, image: Image, legacy: bool) -> list[Problem]:
    """Render `image` (legacy or not) into scratch and run packer validate with dummy values."""
    import hcl2

    text = render_text(image, legacy=legacy)
    folder = ctx.scratch / image.name
    folder.mkdir(parents=True, exist_ok=True)
    template = folder / "template.pkr.hcl"
    template.write_text(text, encoding="utf-8")
    argv: list[str] = ["packer", "validate"]
    for name, value in dummy_values(image, hcl2.loads(text), folder, ctx).items():
        argv += ["-var", f"{name}={value}"]
    argv.append(str(template))
    try:
        run(argv, cwd=folder, timeout=PACKER_TIMEOUT)
    except CommandFailed as exc:
        where = f"{image.name} ({'packer < 1.7' if legacy else 'current'} rendering)"
        return [Problem("packer-validate", where, exc.tail or exc.message)]
    return []


def dummy_values(image: Image, parsed: dict, folder: Path, ctx: LintContext) -> dict[str, str]:
    """A value for every variable without a default: plausible, and existing where Packer checks."""
    iso = folder / "installer.iso"
    iso.write_bytes(b"imagepipe lint placeholder\n")
    key = _lint_key(ctx.scratch)
    ks = folder / "kickstart"  # what a kickstart_dir holds: the file Anaconda reads
    ks.mkdir(exist_ok=True)
    (ks / "ks.cfg").write_text("# imagepipe lint placeholder\n")
    known = {
        "accelerator": "tcg",
        "cpu_model": "max",
        "output_dir": str(folder / "packer-out"),
        "console_log": str(folder / "console.log"),
        "ssh_private_key_file": str(key),
        "iso_url": str(iso),
        "iso_checksum": "sha256:" + hashlib.sha256(iso.read_bytes()).hexdigest(),
        "kickstart_dir": str(ks),
    }
    values = {}
    for block in parsed.get("variable", []):
        for raw_name, body in block.items():
            name = raw_name.strip('"')
            if "default" in body:
                continue
            if name not in known:  # a file-ish placeholder that exists
                placeholder = folder / f"{name}.placeholder"
                placeholder.touch()
            values[name] = known.get(name, str(folder / f"{name}.placeholder"))
    return values


def _lint_key(scratch: Path) -> Path:
    key = scratch / "lint_ed25519"
    if not key.exists():
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "imagepipe-lint", "-f", str(key)])
    return key


@register("packer-fmt")
def check_fmt(ctx: LintContext) -> list[Problem]:
    """Committed templates are `packer fmt` clean."""
    problems = []
    for path in ctx.committed(".pkr.hcl"):
        if not path.exists():
            continue  # reported by drift
        res = run(["packer", "fmt", "-check", str(path)], check=False, timeout=PACKER_TIMEOUT)
        if not res.ok:
            problems.append(Problem("packer-fmt", ctx.rel(path), "not packer fmt clean: run invoke fmt"))
    return problems


@register("nix")
def check_nix(ctx: LintContext) -> list[Problem]:
    """Every .nix file parses (nix-instantiate --parse) and the project flake evaluates where it can."""
    nix_built = any(distros.profile(i).driver.name == "nix" for i in ctx.cfg.images.values())
    if not nix_built and not (ctx.cfg.root / "nixos").is_dir():
        return []
    problems = lint_nix.lint_problems(ctx.cfg.root, ctx.notes.append, ctx.unchecked.append)
    return [Problem("nix", "nixos/", message) for message in problems]

