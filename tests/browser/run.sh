#!/usr/bin/env bash
# Browser tests of the dashboard: builds kloigos, serves it on a fake root over TCP with bearer
# tokens, and drives Debian's Chromium through tests/browser/dashboard.mjs (playwright-core).
# Screenshots go to target/browser/. Ends with `browser: N passed, M failed`.
#
#   tests/browser/run.sh            (as root, or with sudo available for apt-get)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

# shellcheck source=../../scripts/lib/deps.sh
. "$repo/scripts/lib/deps.sh"
if [ ! -x /usr/bin/chromium ] || ! command -v ssh-keygen >/dev/null; then
  echo "# installing chromium and openssh-client with apt"
  mkdir -p "$repo/target"
  deps_install chromium openssh-client >/dev/null 2>"$repo/target/browser-apt.log" \
    || { tail -20 "$repo/target/browser-apt.log"; exit 1; }
fi

echo "# npm dependencies"
(
  cd "$here"
  if [ -f package-lock.json ]; then
    npm ci --no-audit --no-fund --loglevel=error
  else
    npm install --no-audit --no-fund --loglevel=error
  fi
) 2>&1 | grep -v 'Unknown user config' | sed 's/^/# /' || true

echo "# cargo build"
(cd "$repo" && cargo build --quiet)
bin="$repo/target/debug/kloigos"

tmp="$(mktemp -d)"
server_pid=""
cleanup() {
  if [ -n "$server_pid" ]; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT

# A fake host: 64 CPUs on two NUMA nodes.
host=webhost
root="$tmp/root"
mkdir -p "$root/etc/skel" "$root/sys/devices/system/cpu" "$root/proc/sys/net/ipv4" \
  "$root/sys/devices/system/node/node0" "$root/sys/devices/system/node/node1"
echo "$host" >"$root/etc/hostname"
echo 0-63 >"$root/sys/devices/system/cpu/online"
echo 0-31 >"$root/sys/devices/system/node/node0/cpulist"
echo 32-63 >"$root/sys/devices/system/node/node1/cpulist"
printf '32768\t60999\n' >"$root/proc/sys/net/ipv4/ip_local_port_range"
echo '# skel' >"$root/etc/skel/.bashrc"

free_port() { node -e 'const s=require("net").createServer().listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})'; }
port="$(free_port)"
url="http://127.0.0.1:$port"

# Bearer tokens: an admin for the test, a readonly one to check what it may not do.
token="$(KLOIGOS_TOKENS="$tmp/tokens" "$bin" token create --role admin --name browser)"
readonly_token="$(KLOIGOS_TOKENS="$tmp/tokens" "$bin" token create --role readonly --name browser-ro)"
serve_args=(--tokens "$tmp/tokens")

KLOIGOS_LOG=warn "$bin" serve --listen "127.0.0.1:$port" --root "$root" --db "$tmp/kloigos.db" \
  --templates "$repo/templates" "${serve_args[@]}" >"$tmp/serve.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 100); do
  curl -sf "$url/healthz" >/dev/null 2>&1 && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$tmp/serve.log"; echo "kloigos serve exited"; exit 1; }
  sleep 0.1
done

auth=(-H "Authorization: Bearer $token")
curl -sf "${auth[@]}" -X POST "$url/api/admin/init_server" -H 'content-type: application/json' \
  -d "{\"ip\": \"192.0.2.10\", \"region\": \"eu\", \"zone\": \"a\", \"hostname\": \"$host\",
       \"cpu_ranges\": [\"0-3\", \"4-7\", \"8-11\", \"12-15\", \"16-31\", \"32-47\", \"48-55\", \"56-62:2\"]}" >/dev/null

test_url="$url"

rc=0
KLOIGOS_URL="$test_url" KLOIGOS_TOKEN="$token" KLOIGOS_READONLY_TOKEN="$readonly_token" \
  KLOIGOS_LOCAL_HOST="$host" KLOIGOS_ONLINE_CPUS=64 SCREENSHOTS="$repo/target/browser" \
  node "$here/dashboard.mjs" || rc=$?
cp "$tmp/serve.log" "$repo/target/browser/serve.log" 2>/dev/null || true
exit "$rc"
