#!/bin/sh
# The Debian image's install steps by hand (bench/debian.py times this against imagepipe's own):
# the new root's GRUB tools, the disk (GPT, ext4 from the folder, FAT ESP) and the BIOS boot code,
# then qcow2. The same commands and values the engine uses, in plain shell.
#   debian_by_hand.sh ROOT_DIR WORK_DIR ARCH(x86_64|aarch64) DISK_MIB EPOCH ROOT_UUID HASH_SEED ESP_ID SFDISK_FILE GRUB_CFG EARLY_CFG
set -eu
root="$1" work="$2" arch="$3" disk_mib="$4" epoch="$5" uuid="$6" seed="$7" esp_id="$8" table="$9"
shift 9
grub_cfg="$1" early="$2"
disk="$work/disk.raw"
if [ "$arch" = x86_64 ]; then efi_platform=x86_64-efi efi=BOOTX64.EFI; else efi_platform=arm64-efi efi=BOOTAA64.EFI; fi

# boot loaders: GRUB's modules and config into the root, its images by the root's own grub-mkimage
mkdir -p "$root/boot/grub" "$root/run/imagepipe"
cp "$grub_cfg" "$root/boot/grub/grub.cfg"
cp "$early" "$root/run/imagepipe/early.cfg"
cp -r "$root/usr/lib/grub/$efi_platform" "$root/boot/grub/"
chroot "$root" grub-mkimage -O "$efi_platform" -o "/run/imagepipe/$efi" -c /run/imagepipe/early.cfg \
  -p /boot/grub part_gpt ext2 search search_fs_uuid
if [ "$arch" = x86_64 ]; then
  cp -r "$root/usr/lib/grub/i386-pc" "$root/boot/grub/"
  chroot "$root" grub-mkimage -O i386-pc -o /boot/grub/i386-pc/core.img -c /run/imagepipe/early.cfg \
    -p /boot/grub biosdisk part_gpt ext2 search search_fs_uuid
fi
mkdir -p "$work/esp/EFI/BOOT"
mv "$root/run/imagepipe/$efi" "$work/esp/EFI/BOOT/"
rm -rf "$root/run/imagepipe"

# the disk: GPT, the root's ext4 from the folder at its offset, the ESP
find "$root" -newermt "@$epoch" -exec touch -h -d "@$epoch" {} +
truncate -s "${disk_mib}M" "$disk"
sfdisk --quiet --no-reread --no-tell-kernel "$disk" < "$table"
root_bytes=$(( (disk_mib * 1048576 - 33 * 512 - 134217728) / 4096 * 4096 ))
E2FSPROGS_FAKE_TIME="$epoch" MKE2FS_CONFIG="$root/etc/mke2fs.conf" mke2fs -q -F -t ext4 -b 4096 -L root -U "$uuid" \
  -E "hash_seed=$seed,offset=134217728" -d "$root" "$disk" $((root_bytes / 4096))
{ printf 'sif / atime @%s\nsif / ctime @%s\n' "$epoch" "$epoch"
  find "$root" -mindepth 1 -printf "sif \"/%P\" atime @%Ts\nsif \"/%P\" ctime @$epoch\n"; } |
  E2FSPROGS_FAKE_TIME="$epoch" debugfs -w -f - "$disk?offset=134217728" >/dev/null 2>&1
SOURCE_DATE_EPOCH="$epoch" mkfs.vfat -F 32 -s 1 -S 512 -i "$esp_id" --offset 8192 "$disk" 126976 >/dev/null
export MTOOLS_SKIP_CHECK=1 SOURCE_DATE_EPOCH="$epoch"
mmd -i "$disk@@4194304" ::/EFI ::/EFI/BOOT
mcopy -i "$disk@@4194304" "$work/esp/EFI/BOOT/$efi" "::/EFI/BOOT/$efi"

# BIOS: the root's grub-bios-setup on the disk file, mountinfo naming that file as the root device
if [ "$arch" = x86_64 ]; then
  printf '1 0 1:1 / / rw - ext2 /run/imagepipe/disk rw\n' > "$work/mountinfo"
  unshare --mount --propagation private -- sh -c '
    mkdir -p "$1/run/imagepipe"; : > "$1/run/imagepipe/disk"
    mount -t proc proc "$1/proc"
    mount --bind "$2" "$1/run/imagepipe/disk"
    mount --bind "$3" "$1/proc/$$/mountinfo"
    exec chroot "$1" /usr/lib/grub/i386-pc/grub-bios-setup --directory=/boot/grub/i386-pc /run/imagepipe/disk' \
    sh "$root" "$disk" "$work/mountinfo"
fi
qemu-img convert -f raw -O qcow2 "$disk" "$work/disk.qcow2"
