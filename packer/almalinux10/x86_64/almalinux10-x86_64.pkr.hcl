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

variable "iso_url" {
  type        = string
  description = "the AlmaLinux boot ISO (a local path after imagepipe downloaded and verified it)"
}

variable "iso_checksum" {
  type        = string
  description = "sha256:<hex> of the ISO, from the mirror's CHECKSUM file (iso.lock.json)"
}

variable "kickstart_dir" {
  type        = string
  description = "folder holding this image's ks.cfg (as committed under kickstart/almalinux<major>/<arch>/<image>)"
}

variable "packages_file" {
  type        = string
  description = "where the guest's package list is downloaded to (imagepipe: the build's staging folder)"
}

variable "ssh_username" {
  type        = string
  description = "account Packer logs in with once the installed system has rebooted"
  default     = "admin"
}

variable "ssh_timeout" {
  type        = string
  description = "how long Packer waits for the installed system's SSH (imagepipe: 1h with KVM/HVF, 4h with TCG)"
  default     = "4h"
}

variable "efi_firmware_code" {
  type        = string
  description = "UEFI firmware code for this host (OVMF, AAVMF or Homebrew edk2)"
}

variable "efi_firmware_vars" {
  type        = string
  description = "a writable copy of the matching UEFI variable store, one per build"
}

variable "ssh_password" {
  type        = string
  description = "password Packer logs in with; set through PKR_VAR_ssh_password (imagepipe: IMAGEPIPE_SSH_PASSWORD)"
  default     = ""
  sensitive   = true
}

source "qemu" "almalinux" {
  vm_name           = "almalinux10-x86_64.qcow2"
  output_directory  = var.output_dir
  iso_url           = var.iso_url
  iso_checksum      = var.iso_checksum
  qemu_binary       = "qemu-system-x86_64"
  machine_type      = "q35"
  accelerator       = var.accelerator
  cpus              = 2
  memory            = 4096
  disk_size         = "20480M"
  disk_interface    = "virtio"
  disk_discard      = "unmap"
  disk_compression  = true
  format            = "qcow2"
  net_device        = "virtio-net"
  headless          = true
  vnc_bind_address  = "127.0.0.1"
  efi_boot          = true
  efi_firmware_code = var.efi_firmware_code
  efi_firmware_vars = var.efi_firmware_vars
  http_directory    = var.kickstart_dir
  http_bind_address = "127.0.0.1"
  boot_wait         = "30s"
  boot_command = [
    "<up><wait>",
    "e<wait2>",
    "<down><down><end><wait>",
    " inst.text inst.ks=http://{{ .HTTPIP }}:{{ .HTTPPort }}/ks.cfg console=tty0 console=ttyS0,115200n8",
    "<wait><leftCtrlOn>x<leftCtrlOff>",
  ]
  communicator         = "ssh"
  ssh_username         = var.ssh_username
  ssh_password         = var.ssh_password
  ssh_private_key_file = var.ssh_private_key_file
  ssh_timeout          = var.ssh_timeout
  shutdown_command     = "sudo -n /sbin/shutdown -P now"
  shutdown_timeout     = "15m"
  qemuargs = [
    [
      "-netdev",
      "user,id=user.0,hostfwd=tcp:127.0.0.1:{{ .SSHHostPort }}-:22",
    ],
    [
      "-serial",
      "file:${var.console_log}",
    ],
    [
      "-cpu",
      "${var.cpu_model}",
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
}

build {
  sources = [
    "source.qemu.almalinux",
  ]

  provisioner "file" {
    direction   = "download"
    source      = "/var/lib/imagepipe/rpm-packages.tsv"
    destination = var.packages_file
  }
}
