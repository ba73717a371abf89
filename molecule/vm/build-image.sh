#!/usr/bin/env bash
# Build (or reuse) the Debian 12 base disk image the molecule VMs boot from.
#
#   build-image.sh [EXTRA_PACKAGE...]
#
# Everything comes from Debian's archive via debootstrap: no cloud images, no other downloads.
# The result lives OUTSIDE the repository, keyed by a hash of this script, so a rerun with an
# unchanged script only prints the paths:
#
#   $TFO_MOLECULE_CACHE/<key>/base.qcow2   ext4 root filesystem, whole disk (root=/dev/vda)
#   $TFO_MOLECULE_CACHE/<key>/vmlinuz      Debian's kernel, booted with qemu -kernel
#   $TFO_MOLECULE_CACHE/<key>/initrd.img   its initramfs (MODULES=most: has virtio_blk)
#   $TFO_MOLECULE_CACHE/<key>/id_ed25519   SSH key authorised for user "tfo" (passwordless sudo)
#   $TFO_MOLECULE_CACHE/current            symlink to the newest <key>
#
# Everything the role and the agent package need at run time is installed here, so the VMs
# need no network beyond this machine.
set -euo pipefail

CACHE="${TFO_MOLECULE_CACHE:-/var/cache/tfo-agent-molecule}"
MIRROR="${TFO_MOLECULE_MIRROR:-http://deb.debian.org/debian}"
SUITE=bookworm
SIZE=3G
# Runtime needs of the VM: boot, SSH, Ansible (python3), the agent's likely distro
# dependencies (libbpf1, python3 libraries) and tools the tests use (curl, capsh, bpftool).
PACKAGES=(
  linux-image-amd64 systemd-sysv udev kmod dbus openssh-server sudo python3 python3-apt
  libnss-myhostname iproute2 procps less ca-certificates curl libcap2-bin libbpf1 bpftool
  python3-yaml python3-prometheus-client python3-grpcio python3-protobuf python3-requests
  python3-deprecated python3-typing-extensions
)
# Extra packages (e.g. the Depends of the package under test that the list above lacks) come
# as arguments; they are part of the cache key.
EXTRA=("$@")
PACKAGES+=("${EXTRA[@]}")

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
key="$({ cat "$here/build-image.sh"; printf '%s\n' "${EXTRA[@]}" | sort -u; } | sha256sum | cut -c1-16)"
out="$CACHE/$key"

if [[ -s "$out/base.qcow2" && -s "$out/vmlinuz" && -s "$out/initrd.img" && -s "$out/id_ed25519" ]]; then
  ln -sfn "$key" "$CACHE/current"
  echo "$out"
  exit 0
fi

for tool in debootstrap mkfs.ext4 qemu-img ssh-keygen; do
  command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install debootstrap e2fsprogs qemu-utils openssh-client)" >&2; exit 1; }
done
[[ $EUID -eq 0 ]] || { echo "build-image.sh must run as root (debootstrap)" >&2; exit 1; }

start=$(date +%s)
mkdir -p "$CACHE/debs"
work="$(mktemp -d "$CACHE/build.XXXXXX")"
root="$work/root"
cleanup() {
  for m in proc sys dev/pts dev; do umount -l "$root/$m" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

echo ">> debootstrap $SUITE into $root" >&2
includes="$(IFS=,; echo "${PACKAGES[*]}")"
debootstrap --variant=minbase --cache-dir="$CACHE/debs" --include="$includes" \
  "$SUITE" "$root" "$MIRROR" >"$work/debootstrap.log" 2>&1 || {
  tail -40 "$work/debootstrap.log" >&2; exit 1; }

echo ">> configuring the guest" >&2
echo "tfo-vm" >"$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\ttfo-vm\n' >"$root/etc/hosts"
printf '/dev/vda\t/\text4\tdefaults,errors=remount-ro\t0\t1\n' >"$root/etc/fstab"
cat >"$root/etc/apt/sources.list" <<SRC
deb $MIRROR $SUITE main
SRC
# each VM gets its own machine-id at first boot
: >"$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"

# DHCP on qemu's user-mode network (10.0.2.0/24); net.ifnames=0 makes the NIC eth0
mkdir -p "$root/etc/systemd/network"
cat >"$root/etc/systemd/network/10-eth.network" <<NET
[Match]
Name=eth* en*

[Network]
DHCP=ipv4
NET
chroot "$root" systemctl enable systemd-networkd.service ssh.service >/dev/null 2>&1
# no waiting for "online": nothing here needs it and it slows boot
chroot "$root" systemctl mask systemd-networkd-wait-online.service >/dev/null 2>&1
# serial console login for debugging (console=ttyS0)
chroot "$root" systemctl enable serial-getty@ttyS0.service >/dev/null 2>&1 || true

# login user for Ansible: key only, passwordless sudo (as fleets usually are)
chroot "$root" useradd -m -s /bin/bash tfo
echo 'tfo ALL=(ALL) NOPASSWD:ALL' >"$root/etc/sudoers.d/tfo"
chmod 0440 "$root/etc/sudoers.d/tfo"
rm -f "$work/id_ed25519" "$work/id_ed25519.pub"
ssh-keygen -q -t ed25519 -N '' -C tfo-molecule -f "$work/id_ed25519"
install -d -m 0700 -o 1000 -g 1000 "$root/home/tfo/.ssh"
install -m 0600 -o 1000 -g 1000 "$work/id_ed25519.pub" "$root/home/tfo/.ssh/authorized_keys"
cat >"$root/etc/ssh/sshd_config.d/10-molecule.conf" <<SSHD
PasswordAuthentication no
UseDNS no
SSHD

# smaller image, faster boot
chroot "$root" apt-get clean
rm -rf "$root/var/lib/apt/lists/"*

cp -L "$root/vmlinuz" "$work/vmlinuz"
cp -L "$root/initrd.img" "$work/initrd.img"

echo ">> making the ext4 image" >&2
mkfs.ext4 -q -F -L tforoot -d "$root" "$work/base.raw" "$SIZE"
qemu-img convert -O qcow2 "$work/base.raw" "$work/base.qcow2"

mkdir -p "$out"
mv "$work/base.qcow2" "$work/vmlinuz" "$work/initrd.img" "$work/id_ed25519" "$work/id_ed25519.pub" "$out/"
cp "$work/debootstrap.log" "$out/"
echo "built $(date -u +%FT%TZ) in $(( $(date +%s) - start ))s from $MIRROR $SUITE" >"$out/BUILD_INFO"
ln -sfn "$key" "$CACHE/current"
echo ">> built in $(( $(date +%s) - start ))s" >&2
echo "$out"
