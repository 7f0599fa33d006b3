#!/usr/bin/env bash
# Fuzzes the HTTP API from its own OpenAPI document with schemathesis: builds kloigos, serves it
# over TCP on a fake root (16 CPUs on two NUMA nodes, a few units, one allocated), and checks
# every response against the document (status codes, content types, response schemas) and for
# server errors, with an admin bearer token. Schemathesis lives in a venv under target/.
# Ends with `fuzz: N passed, M failed` and exits non-zero on a failure.
#
#   tests/fuzz/run.sh        FUZZ_MAX_EXAMPLES=50 FUZZ_SEED=1 tests/fuzz/run.sh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="$repo/target/fuzz-venv"

if ! "$venv/bin/schemathesis" --version 2>/dev/null | grep -qF "$(sed -n 's/^schemathesis==//p' "$here/requirements.txt")"; then
  echo "# installing schemathesis into $venv"
  if ! python3 -c 'import ensurepip' 2>/dev/null; then
    # shellcheck source=../../scripts/lib/deps.sh
    . "$repo/scripts/lib/deps.sh"
    deps_install python3-venv >/dev/null
  fi
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.txt"
fi

# shellcheck source=../lib/fakehost.sh
. "$repo/tests/lib/fakehost.sh"
fakehost_start fuzzhost 0-15 0-7 8-15
token="$(KLOIGOS_TOKENS="$tokens" "$bin" token create --role admin --name fuzz)"
fakehost_serve

auth=(-H "Authorization: Bearer $token")
curl -sf "${auth[@]}" -X POST "$url/api/admin/init_server" -H 'content-type: application/json' \
  -d "{\"ip\": \"192.0.2.10\", \"region\": \"eu\", \"zone\": \"a\", \"hostname\": \"$host\",
       \"cpu_ranges\": [\"0-3\", \"4-7\", \"8-11\", \"12-13\", \"14\", \"15\"]}" >/dev/null
curl -sf "${auth[@]}" -X POST "$url/api/admin/init_server" -H 'content-type: application/json' \
  -d '{"ip": "192.0.2.11", "region": "eu", "zone": "b", "hostname": "remotehost", "cpu_ranges": ["0-7", "8-15"], "inventory_only": true}' >/dev/null
key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGetNAjig/WY5cl56CGIJLY+2C2xw+XspV+LHtdWkWmo fuzz"
curl -sf "${auth[@]}" -X POST "$url/api/compute_units/allocate" -H 'content-type: application/json' \
  -d "{\"cpu_count\": 4, \"tags\": {\"owner\": \"fuzz\"}, \"ssh_public_key\": \"$key\"}" >/dev/null

# Bounded: 25 examples per operation and phase, 75 s in all (schemathesis.toml), killed at 170 s.
rc=0
(
  cd "$tmp"
  timeout 170 "$venv/bin/schemathesis" --config-file "$here/schemathesis.toml" run "$url/openapi.json" \
    --header "Authorization: Bearer $token" \
    --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
    --max-examples "${FUZZ_MAX_EXAMPLES:-25}" ${FUZZ_SEED:+--seed "$FUZZ_SEED"} \
    --workers 1 --request-timeout 20 --no-color \
    --report junit --report-junit-path "$tmp/junit.xml"
) | tee "$tmp/fuzz.log" || rc=$?

mkdir -p "$repo/target/fuzz"
cp "$tmp/fuzz.log" "$tmp/serve.log" "$repo/target/fuzz/" 2>/dev/null || true
cp "$tmp/junit.xml" "$repo/target/fuzz/" 2>/dev/null || true

# Operations passed and failed, from the JUnit report (one test case per operation).
read -r passed failed < <(python3 - "$tmp/junit.xml" <<'EOF'
import sys, xml.etree.ElementTree as ET
try:
    cases = list(ET.parse(sys.argv[1]).getroot().iter("testcase"))
except (OSError, ET.ParseError):
    print(0, 1)
    sys.exit()
bad = sum(1 for c in cases if c.find("failure") is not None or c.find("error") is not None)
print(len(cases) - bad, bad)
EOF
)
if [ "$rc" -ne 0 ] && [ "$failed" -eq 0 ]; then
  failed=1 # schemathesis failed without a failing operation (timeout, crash)
fi
if ! kill -0 "$server_pid" 2>/dev/null; then
  echo "kloigos serve died during the run:"; tail -20 "$tmp/serve.log"
  failed=$((failed + 1))
fi
echo "fuzz: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
