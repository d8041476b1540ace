#!/usr/bin/env bash
# Builds tern's test guest image, idempotently, into /var/lib/tern/guest (or $TERN_GUEST_DIR):
#   vmlinuz        Debian's cloud kernel (virtio only, no e1000)
#   initrd.img     gzip newc cpio: busybox-static, the static tern-guest, virtio modules, /init
#   manifest.json  kernel version, sha256 of tern-guest / init / outputs, module load order
# The kernel is downloaded only when missing; the initrd is rebuilt when tern-guest or /init
# changed (sha256 compared with the manifest) or with --force. See docs/guest.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

OUT=${TERN_GUEST_DIR:-/var/lib/tern/guest}
TARGET=x86_64-unknown-linux-gnu
BIN=target/$TARGET/release/tern-guest
KERNEL_META=linux-image-cloud-amd64
# Module names; their dependencies are resolved from each .ko's modinfo (the .deb ships no
# modules.dep). virtio_pci is the transport, virtio_net the NIC, virtio_blk the disks.
WANTED_MODULES=(virtio_pci virtio_net virtio_blk)
# Kernel command line tern boots with (documented in docs/guest.md; the tern.* keys follow).
APPEND_BASE="console=ttyS0 quiet mitigations=off tsc=reliable no_timer_check"
FORCE=0
[ "${1:-}" = "--force" ] && FORCE=1

say() { echo "guest-image: $*"; }
die() { echo "guest-image: error: $*" >&2; exit 1; }
sha() { sha256sum "$1" | cut -d' ' -f1; }
# A string field of the existing manifest (flat JSON written by this script), or "".
manifest_get() {
  [ -f "$OUT/manifest.json" ] || return 0
  sed -n "s/^  \"$1\": \"\\([^\"]*\\)\",\\{0,1\\}$/\\1/p" "$OUT/manifest.json" | head -1
}

[ "$(id -u)" -eq 0 ] || die "run as root (writes $OUT, makes device nodes for the initrd)"
for tool in busybox cpio gzip dpkg-deb apt-get; do
  command -v "$tool" >/dev/null || die "$tool not found (scripts/setup.sh installs it)"
done
BUSYBOX=$(command -v busybox)
if command -v file >/dev/null; then
  file -L "$BUSYBOX" | grep -q 'statically linked' || die "$BUSYBOX is not static: install busybox-static"
fi

# 1. The workload binary, static (glibc +crt-static) so the initrd needs no libraries.
if ! command -v cargo >/dev/null 2>&1; then
  [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
fi
say "building tern-guest (static, $TARGET)"
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release --locked --quiet -p tern-guest --target "$TARGET"
ldd_out=$(ldd "$BIN" 2>&1 || true)
grep -qE 'not a dynamic executable|statically linked' <<<"$ldd_out" ||
  die "$BIN is not statically linked: $ldd_out"

mkdir -p "$OUT"
TMP=$(mktemp -d /tmp/tern-guest-image.XXXXXX)
trap 'rm -rf "$TMP"' EXIT

# 2. The kernel and its virtio modules, cached in $OUT/kernel (downloaded only if missing).
if [ -f "$OUT/vmlinuz" ] && [ -f "$OUT/kernel/version" ] && [ -f "$OUT/kernel/modules.order" ]; then
  say "kernel present: $(cat "$OUT/kernel/version")"
else
  pkg=$(apt-cache depends "$KERNEL_META" 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
  if [ -z "$pkg" ]; then
    say "apt-get update (no candidate for $KERNEL_META)"
    apt-get update -qq
    pkg=$(apt-cache depends "$KERNEL_META" | awk '/Depends: linux-image-/ {print $2; exit}')
  fi
  [ -n "$pkg" ] || die "cannot resolve the kernel package behind $KERNEL_META"
  say "downloading $pkg"
  # apt-get download drops privileges to _apt: give it a directory it may write.
  mkdir -p "$TMP/deb" && chmod 777 "$TMP/deb"
  (cd "$TMP/deb" && apt-get download -q "$pkg" 2>&1 | grep -v 'sandbox' || true)
  deb=$(ls "$TMP"/deb/*.deb 2>/dev/null | head -1 || true)
  [ -n "$deb" ] || die "apt-get download $pkg produced no .deb"
  dpkg-deb -x "$deb" "$TMP/kx"
  vmlinuz=$(ls "$TMP"/kx/boot/vmlinuz-* 2>/dev/null | head -1 || true)
  [ -n "$vmlinuz" ] || die "no boot/vmlinuz-* in $deb"
  kver=${vmlinuz##*/vmlinuz-}
  moddir="$TMP/kx/lib/modules/$kver"
  [ -d "$moddir" ] || die "no modules for $kver in $deb"

  # Depth-first over modinfo depends=, so every module comes after its dependencies.
  declare -A seen=()
  order=()
  visit() {
    local m=$1 ko deps d
    [ -n "${seen[$m]:-}" ] && return 0
    seen[$m]=1
    ko=$(find "$moddir" \( -name "$m.ko" -o -name "${m//_/-}.ko" \) | head -1)
    [ -n "$ko" ] || die "module $m not found in $kver (compressed modules are not handled)"
    deps=$(tr '\0' '\n' <"$ko" | sed -n 's/^depends=//p' | head -1 || true)
    for d in ${deps//,/ }; do visit "$d"; done
    cp "$ko" "$TMP/mods/$m.ko"
    order+=("$m")
  }
  mkdir -p "$TMP/mods"
  for m in "${WANTED_MODULES[@]}"; do visit "$m"; done

  rm -rf "$OUT/kernel.new" && mkdir -p "$OUT/kernel.new"
  cp "$TMP"/mods/*.ko "$OUT/kernel.new/"
  printf '%s\n' "${order[@]}" >"$OUT/kernel.new/modules.order"
  echo "$kver" >"$OUT/kernel.new/version"
  echo "$pkg $(dpkg-deb -f "$deb" Version)" >"$OUT/kernel.new/package"
  rm -rf "$OUT/kernel" && mv "$OUT/kernel.new" "$OUT/kernel"
  cp "$vmlinuz" "$OUT/vmlinuz.new" && mv "$OUT/vmlinuz.new" "$OUT/vmlinuz"
  rm -f "$OUT/initrd.img" # a new kernel needs its own modules in the initrd
  say "kernel $kver, modules in load order: ${order[*]}"
fi
KVER=$(cat "$OUT/kernel/version")

# 3. /init: mounts, modules, network from the kernel command line, then tern-guest.
cat >"$TMP/init" <<'INIT'
#!/bin/busybox sh
# tern guest init (generated by scripts/guest-image.sh; see docs/guest.md).
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
for m in $(cat /lib/modules/modules.order); do
  insmod "/lib/modules/$m.ko" || echo "tern-init: insmod $m failed"
done
echo "tern-init: modules loaded uptime_s=$(cut -d' ' -f1 /proc/uptime)"

ip=; gw=; workload=web-db; mem=; rate=; seed=1; corrupt=; disk=; diskw=; kvdev=; fe=
for kv in $(cat /proc/cmdline); do
  case "$kv" in
    tern.ip=*) ip=${kv#tern.ip=} ;;
    tern.gw=*) gw=${kv#tern.gw=} ;;
    tern.workload=*) workload=${kv#tern.workload=} ;;
    tern.mem_mb=*) mem=${kv#tern.mem_mb=} ;;
    tern.rate=*) rate=${kv#tern.rate=} ;;
    tern.seed=*) seed=${kv#tern.seed=} ;;
    tern.corrupt_s=*) corrupt=${kv#tern.corrupt_s=} ;;
    tern.disk=*) disk=${kv#tern.disk=} ;;
    tern.diskw=*) diskw=${kv#tern.diskw=} ;;
    tern.kv=*) kvdev=${kv#tern.kv=} ;;
    tern.fe=*) fe=${kv#tern.fe=} ;;
  esac
done

ip link set lo up
if [ -n "$ip" ]; then
  n=0
  while [ ! -e /sys/class/net/eth0 ] && [ $n -lt 100 ]; do sleep 0.05; n=$((n + 1)); done
  if ip addr add "$ip" dev eth0 && ip link set eth0 up; then
    echo "tern-init: eth0 up ip=$ip"
  else
    echo "tern-init: eth0 FAIL ip=$ip"
  fi
  if [ -n "$gw" ]; then ip route add default via "$gw" || echo "tern-init: gateway FAIL gw=$gw"; fi
fi

# A tern volume with an ext4 filesystem (ext4 is built into the cloud kernel): mount it;
# with tern.diskw=N, write N 64 KiB files a second into it (fsync each, 256 files in
# rotation) while the VM runs.
if [ -n "$disk" ] && [ "$disk" != "$kvdev" ]; then
  n=0
  while [ ! -b "/dev/$disk" ] && [ $n -lt 100 ]; do sleep 0.05; n=$((n + 1)); done
  mkdir -p /mnt/disk
  if mount -t ext4 "/dev/$disk" /mnt/disk; then
    echo "tern-init: disk mounted dev=/dev/$disk"
    if [ -n "$diskw" ] && [ "$diskw" -gt 0 ]; then
      mkdir -p /mnt/disk/tern-w
      (i=0; while true; do
        dd if=/dev/urandom of=/mnt/disk/tern-w/f$((i % 256)) bs=64k count=1 conv=fsync 2>/dev/null
        i=$((i + 1)); usleep $((1000000 / diskw))
      done) &
      echo "tern-init: disk writer files_per_s=$diskw"
    fi
  else
    echo "tern-init: disk FAIL dev=/dev/$disk"
  fi
fi

set -- --workload "$workload" --seed "$seed" --ip "${ip:-none}"
[ -n "$mem" ] && set -- "$@" --mem-mb "$mem"
[ -n "$rate" ] && set -- "$@" --rate-mbps "$rate"
[ -n "$corrupt" ] && set -- "$@" --inject-corruption-s "$corrupt"
# tern.kv=vdX: the key-value service keeps its records on that raw disk (docs/dr.md).
[ -n "$kvdev" ] && set -- "$@" --kv "/dev/$kvdev"
# tern.fe=HOST,K: the front-end tier, K commits at the key-value service on HOST per request.
[ -n "$fe" ] && set -- "$@" --frontend "${fe%,*}:7070" --calls "${fe#*,}"
echo "tern-init: starting tern-guest $*"
/bin/tern-guest "$@"
echo "tern-init: tern-guest exited status=$?"
# PID 1 must not exit (the kernel would panic): stay up for inspection.
while true; do sleep 3600; done
INIT

guest_sha=$(sha "$BIN")
init_sha=$(sha "$TMP/init")
if [ "$FORCE" = 0 ] && [ -f "$OUT/initrd.img" ] &&
  [ "$(manifest_get tern_guest_sha256)" = "$guest_sha" ] &&
  [ "$(manifest_get init_sha256)" = "$init_sha" ] &&
  [ "$(manifest_get kernel_version)" = "$KVER" ]; then
  say "initrd up to date (tern-guest $guest_sha)"
  exit 0
fi

# 4. The initramfs (reproducible: fixed mtimes, sorted names, --reproducible cpio).
say "building initrd (tern-guest $guest_sha)"
R="$TMP/root"
mkdir -p "$R/bin" "$R/dev" "$R/lib/modules" "$R/proc" "$R/sys" "$R/tmp" "$R/run"
cp "$BUSYBOX" "$R/bin/busybox"
ln -s busybox "$R/bin/sh"
# Debug info is most of the binary and the initrd lives in guest RAM.
if command -v strip >/dev/null; then strip -o "$R/bin/tern-guest" "$BIN"; else cp "$BIN" "$R/bin/"; fi
cp "$OUT"/kernel/*.ko "$OUT/kernel/modules.order" "$R/lib/modules/"
install -m 0755 "$TMP/init" "$R/init"
# The kernel opens /dev/console before /init runs (and before devtmpfs is mounted).
mknod -m 600 "$R/dev/console" c 5 1
mknod -m 666 "$R/dev/null" c 1 3
find "$R" -exec touch -h -d @0 {} +
(cd "$R" && find . -mindepth 1 | LC_ALL=C sort |
  cpio --quiet -o -H newc -R 0:0 --reproducible | gzip -9 -n) >"$OUT/initrd.img.new"
mv "$OUT/initrd.img.new" "$OUT/initrd.img"

modules_json=$(sed 's/.*/"&"/' "$OUT/kernel/modules.order" | paste -sd,)
cat >"$OUT/manifest.json.new" <<EOF
{
  "kernel_version": "$KVER",
  "kernel_package": "$(cat "$OUT/kernel/package")",
  "tern_guest_sha256": "$guest_sha",
  "init_sha256": "$init_sha",
  "busybox": "$( (busybox --help 2>&1 || true) | head -1 | sed 's/ multi-call.*//; s/"//g')",
  "vmlinuz_sha256": "$(sha "$OUT/vmlinuz")",
  "initrd_sha256": "$(sha "$OUT/initrd.img")",
  "initrd_bytes": $(stat -c %s "$OUT/initrd.img"),
  "append": "$APPEND_BASE",
  "modules": [$modules_json]
}
EOF
mv "$OUT/manifest.json.new" "$OUT/manifest.json"
say "wrote $OUT/{vmlinuz,initrd.img,manifest.json} ($(stat -c %s "$OUT/initrd.img") bytes initrd)"
