#!/usr/bin/env bash
# The demo: the two-site lab on the `mpls` profile (100 Mbit/s, 25 ms RTT, 0.05% loss, 3 ms
# jitter), one iperf3 TCP flow with cubic and one with bbr across it, then the same lab with
# tern's accelerator (`--accel`: a tern node per site, transparent), a small table.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
tern=target/release/tern
secs=${DEMO_SECONDS:-10}

cleanup() { "$tern" lab down >/dev/null 2>&1 || true; }
trap cleanup EXIT
"$tern" lab down >/dev/null
"$tern" lab up --profile mpls
"$tern" lab exec a -- ping -c 5 -i 0.2 -q 198.18.2.1 | tail -1

run() {
  ip netns exec tern-b iperf3 -s -1 -B 198.18.2.1 -p 5201 >/dev/null 2>&1 &
  sleep 0.3
  ip netns exec tern-a iperf3 -c 198.18.2.1 -p 5201 -t "$secs" -C "$1" -J \
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
