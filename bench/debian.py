"""Debian 13 x86_64: imagepipe's build and boot test against the same steps run by hand.

Per pair (3 by default, alternating who goes first), with the .deb cache warm on both sides:
  ours  `invoke build debian13-x86_64 --json`, split by its step events into root assembly
        (mmdebstrap) and install (boot loaders, disk, BIOS boot code, qcow2), then
        `invoke test-image` (the boot test: SSH, the guest contract, systemd "running",
        guest-ping, ACPI power-off);
  raw   the same mmdebstrap command (same hooks, same cache, same private mount namespace), then
        bench/debian_by_hand.sh (the same GRUB, sfdisk, mke2fs, mkfs.vfat, mtools, grub-bios-setup
        and qemu-img commands in plain shell), then QEMU by hand with the same devices: wait for
        an SSH login, `systemctl is-system-running --wait`, `sudo poweroff`, wait for QEMU to exit.
Goal: each step ≤ 1.10× by hand. A last figure: the packages a cached rebuild downloads (goal 0),
from the build's own "N from the .deb cache, M downloaded" line.
Usage: python3 bench/debian.py [PAIRS] [--json]   (as root: the build needs it)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml
from _common import ROOT, alternate, count, figure, finish, say, timed, workspace

from pipeline import config, distros, keys
from pipeline.build import probe_for_build
from pipeline.drivers import debcache, mmdebstrap
from pipeline.model import Accel
from pipeline.plan import make_build_plan
from pipeline.render import debian as render

IMAGE = "debian13-x86_64"
pairs = count(3)
work, output, invoke = workspace()
raw_cfg = yaml.safe_load((ROOT / "invoke.yaml").read_text())
raw_cfg["defaults"]["output_dir"] = str(output)
cfg = config.load(raw_cfg, ROOT)
image = cfg.image(IMAGE)
steps: dict[str, list[float]] = {"root": [], "install": []}
downloads: list[int] = []


def ours_build() -> float:
    """The task; its step events split the time."""
    start = time.perf_counter()
    res = subprocess.run([*invoke, "build", IMAGE, "--json"], cwd=ROOT, capture_output=True, text=True, check=True)
    total = time.perf_counter() - start
    events = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    at = {e["message"].split(" (")[0]: e["ts"] for e in events if e["kind"] == "step"}
    steps["root"].append(at["boot loaders"] - at["assemble root"])
    steps["install"].append(at["verify"] - at["boot loaders"])
    got = [re.search(r"(\d+) downloaded", e["message"]) for e in events if "from the .deb cache" in e["message"]]
    downloads.append(int(got[0].group(1)) if got and got[0] else -1)
    return total


raw_steps: dict[str, list[float]] = {"root": [], "install": []}


def raw_build() -> float:
    """mmdebstrap, then the install steps by hand, into a folder of their own."""
    facts = probe_for_build(cfg, [image])
    profile = distros.profile(image)
    plan = make_build_plan(cfg, image, profile, facts, Accel.AUTO, keys.project_key(cfg.output_dir))
    stage = work / "by-hand"
    shutil.rmtree(stage, ignore_errors=True)
    (stage / "debs-in").mkdir(parents=True)
    (stage / "debs-out").mkdir()
    plan.log_dir.mkdir(parents=True, exist_ok=True)
    prepared = profile.prepare(plan, stage, lambda _line: None)
    debcache.fill(debcache.cache_dir(), stage / "debs-in")
    argv = mmdebstrap.in_namespace(mmdebstrap.mmdebstrap_argv(image, stage, prepared.variables))
    root = timed(argv, cwd=stage, env=mmdebstrap.hook_env(prepared.variables))
    lay = render.layout(image)
    kernel = mmdebstrap.kernel_version(stage / "root")
    for name, text in (("table", lay.sfdisk_script()), ("grub.cfg", render.grub_cfg(image, kernel)),
                       ("early.cfg", render.grub_early_cfg(image))):
        (stage / name).write_text(text)
    install = timed(["sh", str(ROOT / "bench" / "debian_by_hand.sh"), str(stage / "root"), str(stage),
                     image.arch.value, str(image.disk_size), prepared.variables["source_date_epoch"], lay.root_uuid,
                     lay.root_hash_seed, lay.esp_volume_id, str(stage / "table"), str(stage / "grub.cfg"),
                     str(stage / "early.cfg")])
    start = time.perf_counter()  # the build removes the root folder inside its install steps: so here
    shutil.rmtree(stage / "root")
    install += time.perf_counter() - start
    raw_steps["root"].append(root)
    raw_steps["install"].append(install)
    return root + install


def ours_boot() -> float:
    return timed([*invoke, "test-image", IMAGE])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raw_boot() -> float:
    """QEMU by hand on the image built by hand: login, systemd "running", power off."""
    disk = work / "by-hand" / "disk.qcow2"
    port = free_port()
    vars_fd = work / "vars.fd"
    shutil.copy("/usr/share/OVMF/OVMF_VARS_4M.fd", vars_fd)
    key = output / ".keys" / "imagepipe_ed25519"
    qemu = ["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "1024",
            "-drive", "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
            "-drive", f"if=pflash,format=raw,unit=1,file={vars_fd}",
            "-drive", f"if=virtio,format=qcow2,file={disk}", "-snapshot",
            "-netdev", f"user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:22",
            "-device", "virtio-net-pci,netdev=net0", "-device", "virtio-rng-pci",
            "-device", "virtio-serial-pci", "-serial", f"file:{work / 'console.log'}", "-display", "none",
            "-monitor", "none"]
    ssh = ["ssh", "-i", str(key), "-p", str(port), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
           "-o", f"UserKnownHostsFile={work / 'known_hosts'}", "-o", "ConnectTimeout=5", "admin@127.0.0.1"]
    start = time.perf_counter()
    vm = subprocess.Popen(qemu, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while subprocess.run([*ssh, "true"], capture_output=True, timeout=60).returncode != 0:
            if time.perf_counter() - start > 600:
                raise SystemExit("raw boot: no SSH login within 600 s")
            time.sleep(2)
        state = subprocess.run([*ssh, "systemctl", "is-system-running", "--wait"], capture_output=True, text=True,
                               timeout=600).stdout.strip()
        if state != "running":
            raise SystemExit(f"raw boot: systemd is {state!r}")
        subprocess.run([*ssh, "sudo", "poweroff"], capture_output=True, timeout=60)
        vm.wait(timeout=300)
    finally:
        if vm.poll() is None:
            vm.kill()
        (work / "known_hosts").unlink(missing_ok=True)
    return time.perf_counter() - start


if os.geteuid() != 0:
    sys.exit("bench/debian.py: run it as root (the Debian build needs root)")
try:
    say("warming the .deb cache and the tool-version cache: one build of each side")
    ours_build()
    raw_build()
    for series in (*steps.values(), *raw_steps.values(), downloads):
        series.clear()
    builds = alternate(pairs, {"ours": ours_build, "by hand": raw_build}, "build ")
    boots = alternate(pairs, {"ours": ours_boot, "by hand": raw_boot}, "boot test ")
finally:
    shutil.rmtree(work, ignore_errors=True)
cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")), "?")
say(f"CPU: {cpu}")
finish([
    figure("debian build: root assembly (mmdebstrap) vs by hand", steps["root"], raw_steps["root"], limit=1.10),
    figure("debian build: install (GRUB, disk, BIOS code, qcow2) vs by hand", steps["install"], raw_steps["install"],
           limit=1.10),
    figure("debian build: whole task vs the steps by hand", builds["ours"], builds["by hand"], limit=1.10),
    figure("debian boot test (UEFI, TCG) vs login + is-system-running + poweroff by hand", boots["ours"],
           boots["by hand"], limit=1.10),
    figure("debian cached rebuild: packages downloaded", float(max(downloads)), unit="packages", ratio_of="",
           op="<=", limit=0),
])
