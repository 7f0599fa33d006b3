#!/usr/bin/env bash
# Runs Kloigos in the foreground on the embedded SQLite default, against a demo root directory
# (./demo/root) instead of the real host: it renders every file there and runs no system tool,
# so it is safe on any machine. The demo root copies this machine's CPU and NUMA topology.
#   API: http://127.0.0.1:8000 (and unix socket ./demo/kloigos.sock)   Stop: Ctrl-C
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO=${DEMO:-$PWD/demo}
LISTEN=${LISTEN:-127.0.0.1:8000}
command -v cargo >/dev/null || { echo "demo.sh: needs a Rust toolchain (cargo) on PATH" >&2; exit 1; }
cargo build --release --quiet
root=$DEMO/root
mkdir -p "$root/etc" "$root/etc/skel" "$root/sys/devices/system/cpu" "$root/proc/sys/net/ipv4"
[[ -f $root/etc/hostname ]] || echo "${DEMO_HOSTNAME:-demo}" >"$root/etc/hostname"
cp /sys/devices/system/cpu/online "$root/sys/devices/system/cpu/online"
for n in /sys/devices/system/node/node[0-9]*; do
  [[ -r $n/cpulist ]] || continue
  mkdir -p "$root${n}"; cp "$n/cpulist" "$root${n}/cpulist"
done
cp /proc/sys/net/ipv4/ip_local_port_range "$root/proc/sys/net/ipv4/" 2>/dev/null || true
cp -r /etc/skel/. "$root/etc/skel/" 2>/dev/null || true
echo "Kloigos demo: host '$(cat "$root/etc/hostname")', CPUs $(cat "$root/sys/devices/system/cpu/online"), root $root, db $DEMO/kloigos.db"
echo "Try: curl -s -X POST http://$LISTEN/api/admin/init_server -H 'content-type: application/json' \\"
echo "       -d '{\"ip\":\"127.0.0.1\",\"region\":\"local\",\"zone\":\"a\",\"hostname\":\"$(cat "$root/etc/hostname")\",\"cpu_ranges\":[\"0\",\"1\"]}'"
exec ./target/release/kloigos serve --listen "$LISTEN" --listen "$DEMO/kloigos.sock" \
  --root "$root" --db "$DEMO/kloigos.db" --templates "$PWD/templates"
