#!/usr/bin/env bash
# Build (or reuse) the Debian 12 base disk image the molecule VMs boot from.
#
#   build-image.sh [EXTRA_PACKAGE...]
#
# Everything comes from Debian's archive (debootstrap, then apt): no cloud images, no other
# downloads. The result lives OUTSIDE the repository, keyed by a hash of this script, so a rerun
# with an unchanged script only prints the paths:
#
#   $TFO_MOLECULE_CACHE/<key>/base.qcow2   ext4 root filesystem, whole disk (root=/dev/vda)
#   $TFO_MOLECULE_CACHE/<key>/vmlinuz      Debian 12's kernel (6.1), booted with qemu -kernel
#   $TFO_MOLECULE_CACHE/<key>/initrd.img   its initramfs (MODULES=most: has virtio_blk)
#   $TFO_MOLECULE_CACHE/<key>/vmlinuz-<release>, initrd.img-<release>
#                                          the other Debian releases' kernels (EXTRA_KERNELS),
#                                          installed in the same userland (their /lib/modules)
#   $TFO_MOLECULE_CACHE/<key>/kernels.json {"<series>": {"release", "vmlinuz", "initrd", ...}}
#                                          every bootable kernel; vm.py up --kernel <series>
#   $TFO_MOLECULE_CACHE/<key>/id_ed25519   SSH key authorised for user "tfo" (passwordless sudo)
#   $TFO_MOLECULE_CACHE/current            symlink to the newest <key>
#
# Everything the role and the agent package need at run time is installed here, so the VMs
# need no network beyond this machine.
set -euo pipefail

CACHE="${TFO_MOLECULE_CACHE:-/var/cache/tfo-agent-molecule}"
MIRROR="${TFO_MOLECULE_MIRROR:-http://deb.debian.org/debian}"
SECURITY_MIRROR="${TFO_MOLECULE_SECURITY_MIRROR:-http://security.debian.org/debian-security}"
SUITE=bookworm
SIZE=4G
# Kernels of other Debian releases, booted on this same Debian 12 userland: "<series> <suite>...".
# Each is the linux-image-<series>*-amd64 package that those suites' linux-image-amd64 depends on
# (the security suite serves the newest ABI), installed with dpkg in the image so that its
# modules, depmod data and initramfs (Debian 12's initramfs-tools) are made here. Their
# Depends (kmod, initramfs-tools, linux-base) are Debian 12's own packages.
EXTRA_KERNELS=(
  "5.10 bullseye bullseye-security"  # Debian 11: no BPF task storage (5.11), BTF present
  "6.12 trixie trixie-security"      # Debian 13
)
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

if [[ -s "$out/base.qcow2" && -s "$out/kernels.json" && -s "$out/id_ed25519" ]]; then
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
  # the kernel .deb cache is bind-mounted into the root while kernels install: unmount it first
  for m in var/tmp/tfo-kernel-debs proc sys dev/pts dev; do umount -l "$root/$m" 2>/dev/null || true; done
  if findmnt -rn -o TARGET | grep -q "^$root/"; then
    echo "left $work in place: something is still mounted under it" >&2
    return
  fi
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

# The suite's own kernel (6.1), before the others move the /vmlinuz symlink.
default_release="$(basename "$(readlink -f "$root/vmlinuz")")"
default_release="${default_release#vmlinuz-}"
cp -L "$root/vmlinuz" "$work/vmlinuz"
cp -L "$root/initrd.img" "$work/initrd.img"
series() { sed -E 's/^([0-9]+\.[0-9]+).*/\1/' <<<"$1"; }
pkg_version() { chroot "$root" dpkg-query -W -f '${Version}' "linux-image-$1"; }
# one line per bootable kernel: series release suites package-version vmlinuz initrd
printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$(series "$default_release")" "$default_release" "$SUITE" \
  "$(pkg_version "$default_release")" vmlinuz initrd.img >"$work/kernels.tsv"

# The other releases' kernels: apt in the chroot with a throwaway sources list and lists
# directory (the image's own apt configuration stays bookworm-only), the .debs kept in the
# cache next to debootstrap's, dpkg -i in the chroot (postinst: depmod, update-initramfs).
for m in proc sys dev; do mount --bind "/$m" "$root/$m"; done
mkdir -p "$CACHE/debs/kernels" "$root/var/tmp/tfo-kernel-debs"
mount --bind "$CACHE/debs/kernels" "$root/var/tmp/tfo-kernel-debs"
for spec in "${EXTRA_KERNELS[@]}"; do
  read -r want suites <<<"$spec"
  apt_dir="/var/tmp/tfo-apt-$want"
  mkdir -p "$root$apt_dir/lists/partial" "$root$apt_dir/cache"
  : >"$root$apt_dir/status"
  for s in $suites; do
    if [[ "$s" == *-security ]]; then echo "deb $SECURITY_MIRROR $s main"; else echo "deb $MIRROR $s main"; fi
  done >"$root$apt_dir/sources.list"
  apt_opts=(-o "Dir::Etc::sourcelist=$apt_dir/sources.list" -o Dir::Etc::sourceparts=-
    -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::State::status=$apt_dir/status"
    -o "Dir::Cache=$apt_dir/cache" -o APT::Architecture=amd64)
  echo ">> kernel $want: linux-image-amd64 of $suites" >&2
  chroot "$root" apt-get -qq "${apt_opts[@]}" update >&2
  pkg="$(chroot "$root" apt-cache "${apt_opts[@]}" depends linux-image-amd64 \
    | sed -nE 's/^ *Depends: (linux-image-[^ ]+-amd64)$/\1/p' | head -1)"
  release="${pkg#linux-image-}"
  [[ -n "$pkg" && "$(series "$release")" == "$want" ]] || {
    echo "linux-image-amd64 of $suites depends on '${pkg:-nothing}', not a $want kernel" >&2; exit 1; }
  version="$(chroot "$root" apt-cache "${apt_opts[@]}" show --no-all-versions "$pkg" | sed -n 's/^Version: //p')"
  deb="${pkg}_${version//:/%3a}_amd64.deb"
  if [[ ! -s "$CACHE/debs/kernels/$deb" ]]; then
    chroot "$root" sh -c "cd /var/tmp/tfo-kernel-debs && apt-get -qq $(printf '%q ' "${apt_opts[@]}") download '$pkg=$version'" >&2
  fi
  echo ">> kernel $want: installing $pkg $version" >&2
  chroot "$root" env DEBIAN_FRONTEND=noninteractive dpkg -i "/var/tmp/tfo-kernel-debs/$deb" >"$work/kernel-$want.log" 2>&1 || {
    tail -40 "$work/kernel-$want.log" >&2; exit 1; }
  for f in vmlinuz initrd.img; do
    [[ -s "$root/boot/$f-$release" ]] || { echo "no /boot/$f-$release after installing $pkg" >&2; exit 1; }
    cp "$root/boot/$f-$release" "$work/$f-$release"
  done
  [[ -e "$root/lib/modules/$release/modules.dep" ]] || { echo "no modules.dep for $release" >&2; exit 1; }
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$want" "$release" "${suites// /,}" "$version" \
    "vmlinuz-$release" "initrd.img-$release" >>"$work/kernels.tsv"
  rm -rf "${root:?}$apt_dir"
done
umount "$root/var/tmp/tfo-kernel-debs"
rmdir "$root/var/tmp/tfo-kernel-debs"
for m in dev sys proc; do umount "$root/$m"; done
python3 - "$work/kernels.tsv" >"$work/kernels.json" <<'PY'
import json, sys
keys = ("release", "suites", "package_version", "vmlinuz", "initrd")
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1])]
print(json.dumps({r[0]: dict(zip(keys, r[1:])) for r in rows}, indent=2))
PY

# smaller image, faster boot
chroot "$root" apt-get clean
rm -rf "$root/var/lib/apt/lists/"*

echo ">> making the ext4 image" >&2
mkfs.ext4 -q -F -L tforoot -d "$root" "$work/base.raw" "$SIZE"
qemu-img convert -O qcow2 "$work/base.raw" "$work/base.qcow2"

mkdir -p "$out"
mv "$work/base.qcow2" "$work/vmlinuz" "$work/initrd.img" "$work"/vmlinuz-* "$work"/initrd.img-* \
  "$work/id_ed25519" "$work/id_ed25519.pub" "$out/"
cp "$work/debootstrap.log" "$out/"
{
  echo "built $(date -u +%FT%TZ) in $(( $(date +%s) - start ))s from $MIRROR $SUITE"
  awk -F'\t' '{ printf "kernel %s: %s (%s, %s)\n", $1, $2, $4, $3 }' "$work/kernels.tsv"
} >"$out/BUILD_INFO"
mv "$work/kernels.json" "$out/"
ln -sfn "$key" "$CACHE/current"
echo ">> built in $(( $(date +%s) - start ))s" >&2
echo "$out"
