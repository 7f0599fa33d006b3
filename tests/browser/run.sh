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

# shellcheck source=../lib/fakehost.sh
. "$repo/tests/lib/fakehost.sh"
# A fake host: 64 CPUs on two NUMA nodes.
fakehost_start webhost 0-63 0-31 32-63

# Bearer tokens: an admin for the test, a readonly one to check what it may not do.
token="$(KLOIGOS_TOKENS="$tokens" "$bin" token create --role admin --name browser)"
readonly_token="$(KLOIGOS_TOKENS="$tokens" "$bin" token create --role readonly --name browser-ro)"
fakehost_serve

auth=(-H "Authorization: Bearer $token")
curl -sf "${auth[@]}" -X POST "$url/api/admin/init_server" -H 'content-type: application/json' \
  -d "{\"ip\": \"192.0.2.10\", \"region\": \"eu\", \"zone\": \"a\", \"hostname\": \"$host\",
       \"cpu_ranges\": [\"0-3\", \"4-7\", \"8-11\", \"12-15\", \"16-31\", \"32-47\", \"48-55\", \"56-62:2\"]}" >/dev/null

rc=0
KLOIGOS_URL="$url" KLOIGOS_TOKEN="$token" KLOIGOS_READONLY_TOKEN="$readonly_token" \
  KLOIGOS_LOCAL_HOST="$host" KLOIGOS_ONLINE_CPUS=64 SCREENSHOTS="$repo/target/browser" \
  node "$here/dashboard.mjs" || rc=$?
cp "$tmp/serve.log" "$repo/target/browser/serve.log" 2>/dev/null || true
exit "$rc"
