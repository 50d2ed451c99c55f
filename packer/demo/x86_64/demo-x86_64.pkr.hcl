packer {
  required_plugins {
    qemu = {
      source  = "github.com/hashicorp/qemu"
      version = ">= 1.1.0"
    }
  }
}

variable "accelerator" {
  type        = string
  description = "QEMU accelerator chosen by imagepipe for this host (kvm, hvf or tcg); always set"
}

variable "cpu_model" {
  type        = string
  description = "QEMU CPU model: host with KVM/HVF, max with TCG"
}

variable "output_dir" {
  type        = string
  description = "where Packer writes the image (a staging folder; imagepipe publishes it after verification)"
}

variable "console_log" {
  type        = string
  description = "file receiving the guest's serial console (kept outside output_dir, survives failures)"
}

variable "ssh_private_key_file" {
  type        = string
  description = "private key the build logs in with"
}

variable "qmp_socket" {
  type        = string
  description = "QMP socket of the build VM (imagepipe watches it for a full host disk)"
  default     = "packer-qmp.sock"
}

variable "base_disk" {
  type        = string
  description = "blank disk the build starts from (created by imagepipe)"
}

variable "kernel" {
  type        = string
  description = "demo guest kernel (assembled from Debian packages)"
}

variable "initrd" {
  type        = string
  description = "demo guest initramfs"
}

variable "kernel_append" {
  type        = string
  description = "kernel command line"
  default     = "console=ttyS0,115200n8 quiet panic=-1"
}

variable "source_date_epoch" {
  type        = string
  description = "every timestamp on the disk (seconds since 1970; imagepipe: from the guest's packages)"
  default     = "0"
}

source "qemu" "demo-x86_64" {
  accelerator      = var.accelerator
  iso_url          = var.base_disk
  iso_checksum     = "none"
  disk_image       = true
  disk_size        = "64M"
  format           = "qcow2"
  disk_interface   = "virtio"
  net_device       = "virtio-net"
  output_directory = var.output_dir
  vm_name          = "demo-x86_64.qcow2"
  headless         = true
  memory           = 256
  cpus             = 1
  vnc_bind_address = "127.0.0.1"
  qemuargs = [
    [
      "-kernel",
      "${var.kernel}",
    ],
    [
      "-initrd",
      "${var.initrd}",
    ],
    [
      "-append",
      "${var.kernel_append}",
    ],
    [
      "-cpu",
      "${var.cpu_model}",
    ],
    [
      "-serial",
      "file:${var.console_log}",
    ],
    [
      "-netdev",
      "user,id=user.0,hostfwd=tcp:127.0.0.1:{{ .SSHHostPort }}-:22",
    ],
    [
      "-qmp",
      "unix:${var.qmp_socket},server=on,wait=off",
    ],
    [
      "-global",
      "virtio-blk-pci.werror=report",
    ],
  ]
  communicator             = "ssh"
  ssh_username             = "root"
  ssh_private_key_file     = var.ssh_private_key_file
  ssh_file_transfer_method = "sftp"
  ssh_timeout              = "5m"
  host_port_min            = 2300
  host_port_max            = 2399
  boot_wait                = "2s"
  shutdown_command         = "shutdown -P now"
  shutdown_timeout         = "2m"
  skip_compaction          = false
  disk_compression         = false
}

build {
  sources = [
    "source.qemu.demo-x86_64",
  ]

  provisioner "shell" {
    environment_vars = [
      "SOURCE_DATE_EPOCH=${var.source_date_epoch}",
    ]
    inline = [
      "set -e",
      "export E2FSPROGS_FAKE_TIME=\"$SOURCE_DATE_EPOCH\"",
      "root=/tmp/imagepipe-root",
      "rm -rf \"$root\"",
      "mkdir \"$root\"",
      "echo \"imagepipe demo image demo-x86_64\" > \"$root/imagepipe-marker\"",
      "uname -a > \"$root/imagepipe-kernel\"",
      "/sbin/mke2fs -q -F -t ext4 -T default -L imagepipe -U d6a5c73a-690b-5343-9db2-9e6eba128bb4 -E hash_seed=d6a5c73a-690b-5343-9db2-9e6eba128bb4,root_owner=0:0,nodiscard -d \"$root\" /dev/vda",
      "for f in / /imagepipe-marker /imagepipe-kernel; do for t in atime mtime ctime crtime; do echo \"sif $f $t @$SOURCE_DATE_EPOCH\"; done; done | /sbin/debugfs -w -f - /dev/vda >/dev/null 2>/tmp/debugfs.err",
      "if grep -v '^debugfs [0-9]' /tmp/debugfs.err >&2; then exit 1; fi",
      "sync",
    ]
  }
}
