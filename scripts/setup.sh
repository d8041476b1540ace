#!/usr/bin/env bash
# Installs what tern needs on a fresh Debian machine of this kind, idempotently, and builds
# the release binary. Sourced by demo.sh and test.sh; safe to run again.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "tern's lab makes network namespaces and TUN devices: run this as root (sudo $0)" >&2
  exit 1
fi

# Debian packages: iperf3, ping and tcpdump are the real tools the lab is measured with;
# kcptun is the accelerator `tern bench accel` compares tern with (zstd: its corpus ratio).
# qemu-utils (qemu-img, qemu-io, qemu-nbd) and e2fsprogs: NBD interop tests and `tern disk`.
pkgs=(iperf3 iproute2 nftables tcpdump iputils-ping ethtool procps kcptun zstd qemu-system-x86 busybox-static cpio file qemu-utils e2fsprogs)
missing_pkgs() {
  local p
  for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
  done
}
# Two passes: a machine may come with a newer qemu-utils (bookworm-backports) that apt removes
# when it installs Debian's qemu-system-x86 7.2; the second pass installs the matching 7.2.
for pass in 1 2; do
  mapfile -t missing < <(missing_pkgs)
  [ ${#missing[@]} -eq 0 ] && break
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if [ "$pass" -eq 1 ]; then apt-get update -qq; fi
  apt-get install -y -qq "${missing[@]}" >/dev/null
done
for tool in iperf3 tcpdump nft qemu-system-x86_64 qemu-img qemu-io qemu-nbd mkfs.ext4 kcptun-client; do
  command -v "$tool" >/dev/null 2>&1 || { echo "setup: $tool is still missing after apt-get install" >&2; exit 1; }
done

if [ ! -e /dev/net/tun ]; then
  modprobe tun 2>/dev/null || true
  [ -e /dev/net/tun ] || { mkdir -p /dev/net && mknod /dev/net/tun c 10 200 && chmod 600 /dev/net/tun; }
fi

if ! command -v cargo >/dev/null 2>&1; then
  [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
fi
cargo build --release --locked --quiet
bash scripts/guest-image.sh # the test guest (vmlinuz, initrd.img) in /var/lib/tern/guest
