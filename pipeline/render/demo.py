"""The demo image's Packer template: direct kernel boot of the offline demo guest.

Packer's qemu builder boots the demo kernel + initramfs (qemuargs -kernel/-initrd/-append) with a
blank qcow2 as its disk (`disk_image = true`), logs in over SSH with the project key, and a shell
provisioner writes a filesystem and a marker onto the disk before a clean shutdown. Only
arguments both Packer 1.6.6 and the current qemu plugin accept are used. The guest itself is
assembled by pipeline.demo in the profile's prepare step (pipeline.distros.demo).
"""

from __future__ import annotations

from pipeline import demo
from pipeline.config import Image
from pipeline.render.hcl import Block, Expr
from pipeline.render.packer import common_variables, packer_block, variable

MARKER = "imagepipe-marker"

PROVISION = [
    "set -e",
    "mke2fs -q -L imagepipe /dev/vda",
    "mount -t ext4 /dev/vda /mnt",
    f'echo "imagepipe demo build $IMAGEPIPE_BUILD_ID" > /mnt/{MARKER}',
    "uname -a > /mnt/imagepipe-kernel",
    "umount /mnt",
    "sync",
]


def blocks(image: Image, legacy: bool) -> list[Block]:
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
        "vm_name": image.artifact_name,
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
        "skip_compaction": True,
    })
    build = Block("build", body={
        "sources": [f"source.qemu.{name}"],
        "provisioner": [Block("provisioner", ("shell",), {
            "environment_vars": ["IMAGEPIPE_BUILD_ID=${var.build_id}"],
            "inline": PROVISION,
        })],
    })
    variables = common_variables() + [
        variable("base_disk", "blank disk the build starts from (created by imagepipe)"),
        variable("kernel", "demo guest kernel (assembled from Debian packages)"),
        variable("initrd", "demo guest initramfs"),
        variable("kernel_append", "kernel command line", default=demo.APPEND),
        variable("build_id", "imagepipe build id, written into the marker file", default="manual"),
    ]
    return ([] if legacy else [packer_block()]) + variables + [source, build]
