#!/usr/bin/env bash
# The demo, on the `mpls` profile (100 Mbit/s, 25 ms RTT, 0.05% loss, 3 ms jitter):
# 1. live migration of the reference VM (512 MiB, web-db workload) from site A to site B
#    with QEMU over plain kernel TCP (cubic: the "no accel" row), then back through tern;
#    both verified byte for byte; a comparison table.
# 2. one iperf3 TCP flow with cubic and one with bbr, then through tern's transparent
#    accelerator (`--accel`), a small table.
# DEMO_SECONDS sets the iperf3 duration; DEMO_MEM the VM's MiB.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
tern=target/release/tern
secs=${DEMO_SECONDS:-10}

mem=${DEMO_MEM:-512}

cleanup() {
  "$tern" vm stop demo-vm >/dev/null 2>&1 || true
  "$tern" lab down >/dev/null 2>&1 || true
}
trap cleanup EXIT
"$tern" vm stop demo-vm >/dev/null 2>&1 || true
"$tern" lab down >/dev/null
"$tern" lab up --profile mpls
"$tern" lab exec a -- ping -c 5 -i 0.2 -q 198.18.2.1 | tail -1

echo
echo "== live migration of a ${mem} MiB VM (web-db workload) across mpls"
"$tern" vm start demo-vm --site a --mem "$mem" --workload web-db --rate 1
log=$("$tern" vm list --json | python3 -c 'import json,sys; print([v for v in json.load(sys.stdin) if v["name"]=="demo-vm"][0]["serial_log"])')
printf 'waiting for the guest workload'
for _ in $(seq 1 240); do grep -q "verify ok" "$log" 2>/dev/null && break; printf .; sleep 1; done
echo
grep -m1 "tern-guest: ready" "$log" || true
summary() { python3 -c 'import json,sys; d=json.load(sys.stdin); print("%.1f %.0f %.1f %.1f %s" % (d["total_s"], d["downtime_ms"], d["qemu_bytes"]/2**20, d["wire_bytes"]/2**20, d["verified"]))'; }
echo "QEMU over kernel TCP cubic, A -> B (the 'no accel' row; minutes on this link):"
direct=$("$tern" migrate demo-vm --to b --direct --cc cubic --check-memory --json | summary)
echo "through tern, B -> A:"
viatern=$("$tern" migrate demo-vm --to a --check-memory --json | summary)
"$tern" vm stop demo-vm >/dev/null
printf '\n%-34s %9s %12s %11s %11s %9s\n' "live migration on mpls" "total s" "downtime ms" "QEMU MiB" "wire MiB" "verified"
read -r t d q w v <<<"$direct"
printf '%-34s %9s %12s %11s %11s %9s\n' "QEMU over TCP cubic (no accel)" "$t" "$d" "$q" "$w" "$v"
read -r t2 d2 q2 w2 v2 <<<"$viatern"
printf '%-34s %9s %12s %11s %11s %9s\n' "tern" "$t2" "$d2" "$q2" "$w2" "$v2"
python3 -c "print('tern is %.1fx faster' % ($t / $t2))"
echo
echo "== WAN acceleration of plain TCP across mpls"

# Incompressible payload: pseudo-random bytes from a file (iperf3's own "random" payload is
# one 128 KiB buffer repeated, which tern's per-stream zstd window would compress away).
payload=/var/tmp/tern-demo-random.bin
want=$((secs * 20 * 1024 * 1024))
if [ "$(stat -c %s "$payload" 2>/dev/null || echo 0)" -lt "$want" ]; then
  head -c "$want" /dev/urandom >"$payload.partial" && mv "$payload.partial" "$payload"
fi
run() {
  ip netns exec tern-b iperf3 -s -1 -B 198.18.2.1 -p 5201 >/dev/null 2>&1 &
  sleep 0.3
  ip netns exec tern-a iperf3 -c 198.18.2.1 -p 5201 -t "$secs" -C "$1" -F "$payload" -J \
    | python3 -c 'import json,sys; print("%.1f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e6))'
  wait
}
echo "running iperf3 for ${secs}s with each congestion control..."
cubic=$(run cubic)
bbr=$(run bbr)
echo
"$tern" lab stats
"$tern" lab down >/dev/null
"$tern" lab up --profile mpls --accel
echo "running iperf3 for ${secs}s through tern (the same plain iperf3 command)..."
tern_rate=$(run bbr)
"$tern" node status --socket /run/tern/lab/node-a.sock
printf '\n%-10s %-28s %12s\n' "profile" "link" "goodput"
printf '%-10s %-28s %8s Mbit/s   (kernel TCP cubic)\n' mpls "100mbit 25ms 0.05% ±3ms" "$cubic"
printf '%-10s %-28s %8s Mbit/s   (kernel TCP bbr)\n' mpls "100mbit 25ms 0.05% ±3ms" "$bbr"
printf '%-10s %-28s %8s Mbit/s   (tern accelerator, transparent)\n' mpls "100mbit 25ms 0.05% ±3ms" "$tern_rate"
