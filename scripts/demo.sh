#!/usr/bin/env bash
# Runs Kloigos in the foreground on the embedded SQLite default, against a demo root directory
# (./demo/root) instead of the real host: it renders every file there and runs no system tool,
# so it is safe on any machine. The demo root copies this machine's CPU and NUMA topology.
#   API: http://127.0.0.1:8000 (and unix socket ./demo/kloigos.sock)   Stop: Ctrl-C
# It makes its own token file (./demo/tokens) and an admin token, and prints how to use it.
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
# The demo's own token file and admin token: TCP needs one (the demo's unix socket does not).
# A token's secret is shown only once, so each run makes a new one.
tokens=$DEMO/tokens
kloigos=./target/release/kloigos
"$kloigos" token --tokens "$tokens" revoke demo >/dev/null 2>&1 || true
TOKEN=$("$kloigos" token --tokens "$tokens" create --name demo --role admin)
host=$(cat "$root/etc/hostname")
cat <<EOT
Kloigos demo: host '$host', CPUs $(cat "$root/sys/devices/system/cpu/online"), root $root, db $DEMO/kloigos.db
An admin token for this demo (kept hashed in $tokens):
  export TOKEN=$TOKEN
Try, in another shell:
  curl -s -X POST http://$LISTEN/api/admin/init_server -H "Authorization: Bearer \$TOKEN" \\
       -H 'Content-Type: application/json' \\
       -d '{"ip":"127.0.0.1","region":"local","zone":"a","hostname":"$host","cpu_ranges":["0","1"]}'
  curl -s http://$LISTEN/api/compute_units/ -H "Authorization: Bearer \$TOKEN"
Dashboard (signed in with that token): http://$LISTEN/#token=$TOKEN
EOT
exec "$kloigos" serve --listen "$LISTEN" --listen "$DEMO/kloigos.sock" \
  --root "$root" --db "$DEMO/kloigos.db" --templates "$PWD/templates" --tokens "$tokens"
