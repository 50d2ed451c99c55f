"""The demo image's Packer template: direct kernel boot of the offline demo guest.

Packer's qemu builder boots the demo kernel + initramfs (qemuargs -kernel/-initrd/-append) with a
blank qcow2 as its disk (`disk_image = true`), logs in over SSH with the project key, and a shell
provisioner writes a file system holding a marker onto the disk before a clean shutdown. Only
arguments both Packer 1.6.6 and the current qemu plugin accept are used. The guest itself is
assembled by pipeline.demo in the profile's prepare step (pipeline.distros.demo).

The image is bit-for-bit reproducible: the file system is made by e2fsprogs' mke2fs from a
folder (`-d`, the disk is never mounted, so no mount or journal writes) with a UUID and hash seed
fixed per image, every timestamp set to SOURCE_DATE_EPOCH (from the guest's packages, see
pipeline.demo) through E2FSPROGS_FAKE_TIME and debugfs; the marker names the image, never the
build or a date; and Packer's compaction (`qemu-img convert`) rewrites the qcow2 in guest order,
so the order in which the guest's writes reached the disk leaves no trace.
"""

from __future__ import annotations

import uuid

from pipeline import demo
from pipeline.model import Image
from pipeline.render.hcl import Block, Expr
from pipeline.render.packer import WATCH_ARGS, common_variables, packer_block, variable

MARKER = "imagepipe-marker"
FILES = ("/", f"/{MARKER}", "/imagepipe-kernel")
TIMES = ("atime", "mtime", "ctime", "crtime")


def fs_uuid(image: Image) -> str:
    """The file system UUID (and hash seed) of an image: fixed, so two builds write the same bytes."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"imagepipe:demo:{image.name}"))


def provision(image: Image) -> list[str]:
    """The provisioner's shell lines: a reproducible ext4 holding the marker, straight onto /dev/vda."""
    fsid = fs_uuid(image)
    sif = " ".join(FILES)
    return [
        "set -e",
        'export E2FSPROGS_FAKE_TIME="$SOURCE_DATE_EPOCH"',
        "root=/tmp/imagepipe-root",
        'rm -rf "$root"',
        'mkdir "$root"',
        f'echo "{marker_text(image)}" > "$root/{MARKER}"',
        'uname -a > "$root/imagepipe-kernel"',
        ("/sbin/mke2fs -q -F -t ext4 -T default -L imagepipe"
         f' -U {fsid} -E hash_seed={fsid},root_owner=0:0,nodiscard -d "$root" /dev/vda'),
        # mke2fs -d copies each file's ctime, which no tool in the guest can set: debugfs does.
        (f'for f in {sif}; do for t in {" ".join(TIMES)}; do echo "sif $f $t @$SOURCE_DATE_EPOCH"; done; done'
         " | /sbin/debugfs -w -f - /dev/vda >/dev/null 2>/tmp/debugfs.err"),
        # debugfs exits 0 whatever happened: anything on stderr but its banner is a failure.
        "if grep -v '^debugfs [0-9]' /tmp/debugfs.err >&2; then exit 1; fi",
        "sync",
    ]


def marker_text(image: Image) -> str:
    """What the marker file says: the image, never the build id or a date (reproducible)."""
    return f"imagepipe demo image {image.name}"


def blocks(image: Image, legacy: bool, *, artifact_name: str) -> list[Block]:
    """The demo template (identical for old and new Packer except the plugin block)."""
    name = image.name
    source = Block("source", ("qemu", name), {
        "accelerator": Expr("var.accelerator"),
        "iso_url": Expr("var.base_disk"),
        "iso_checksum": "none",
        "disk_image": True,
        "disk_size": f"{image.disk_size}M",
        "format": image.format.value,
        "disk_interface": "virtio",
        "net_device": "virtio-net",
        "output_directory": Expr("var.output_dir"),
        "vm_name": artifact_name,
        "headless": image.headless,
        "memory": image.memory,
        "cpus": image.cpus,
        "vnc_bind_address": "127.0.0.1",
        "qemuargs": [
            ["-kernel", "${var.kernel}"],
            ["-initrd", "${var.initrd}"],
            ["-append", "${var.kernel_append}"],
            ["-cpu", "${var.cpu_model}"],
            ["-serial", "file:${var.console_log}"],
            # Packer's default forward listens on every interface; keep it on loopback.
            ["-netdev", "user,id=user.0,hostfwd=tcp:127.0.0.1:{{ .SSHHostPort }}-:22"],
            *WATCH_ARGS,  # the QMP socket imagepipe watches for a full host disk; werror=report
        ],
        "communicator": "ssh",
        "ssh_username": image.ssh_user,
        "ssh_private_key_file": Expr("var.ssh_private_key_file"),
        "ssh_file_transfer_method": "sftp",
        "ssh_timeout": "5m",
        "host_port_min": 2300,
        "host_port_max": 2399,
        "boot_wait": "2s",
        "shutdown_command": "shutdown -P now",
        "shutdown_timeout": "2m",
        # Packer's compaction (qemu-img convert) writes the qcow2 in guest order: reproducible.
        "skip_compaction": False,
        "disk_compression": image.compress_qcow2,
    })
    build = Block("build", body={
        "sources": [f"source.qemu.{name}"],
        "provisioner": [Block("provisioner", ("shell",), {
            "environment_vars": ["SOURCE_DATE_EPOCH=${var.source_date_epoch}"],
            "inline": provision(image),
        })],
    })
    variables = common_variables() + [
        variable("base_disk", "blank disk the build starts from (created by imagepipe)"),
        variable("kernel", "demo guest kernel (assembled from Debian packages)"),
        variable("initrd", "demo guest initramfs"),
        variable("kernel_append", "kernel command line", default=demo.APPEND),
        variable("source_date_epoch", "every timestamp on the disk (seconds since 1970; imagepipe: from the"
                 " guest's packages)", default="0"),
    ]
    return ([] if legacy else [packer_block()]) + variables + [source, build]
