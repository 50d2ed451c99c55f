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

variable "build_id" {
  type        = string
  description = "imagepipe build id, written into the marker file"
  default     = "manual"
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
  skip_compaction          = true
}

build {
  sources = [
    "source.qemu.demo-x86_64",
  ]

  provisioner "shell" {
    environment_vars = [
      "IMAGEPIPE_BUILD_ID=${var.build_id}",
    ]
    inline = [
      "set -e",
      "mke2fs -q -L imagepipe /dev/vda",
      "mount -t ext4 /dev/vda /mnt",
      "echo \"imagepipe demo build $IMAGEPIPE_BUILD_ID\" > /mnt/imagepipe-marker",
      "uname -a > /mnt/imagepipe-kernel",
      "umount /mnt",
      "sync",
    ]
  }
}
