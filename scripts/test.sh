#!/usr/bin/env bash
# The whole test suite, as CI runs it (as root, on a fresh Debian 12 machine with cargo):
# installs what the tests need, checks formatting and lints, runs the unit, golden, API and
# kernel (nftables in a network namespace) tests, then the end-to-end tests in a VM.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n=== %s\n' "$*"; }
start=$(date +%s)

step "dependencies"
# shellcheck source=lib/deps.sh
. scripts/lib/deps.sh
# shellcheck source=lib/pg.sh
. scripts/lib/pg.sh
deps_need python3:python3 curl:curl nft:nftables systemd-socket-activate:systemd unshare:util-linux setpriv:util-linux prlimit:util-linux \
  ip:iproute2 ssh-keygen:openssh-client ansible-inventory:ansible-core ansible:ansible-core \
  psql:postgresql-client openssl:openssl dbus-daemon:dbus-daemon
rustup component list --installed 2>/dev/null | grep -q clippy || rustup component add clippy rustfmt >/dev/null 2>&1 || true

step "format and lints"
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo clippy --all-targets --all-features --locked -- -D warnings

step "PostgreSQL test cluster"
# A throw-away cluster (Debian's postgresql, as nobody, TLS on) for the PgStore unit tests and
# the API suite's PostgreSQL pass below; removed on exit.
pg_start
trap pg_stop EXIT

step "unit, golden, API and kernel tests"
# test-hooks: the crash-window tests (KLOIGOS_TEST_PAUSE); release builds have no such hooks.
# CI runs as root with every tool installed above: a privileged test may not skip here.
KLOIGOS_REQUIRE_PRIVILEGED=1 cargo test --locked --features test-hooks
# ... and without the feature the pause setting is ignored.
cargo test --locked --lib service::tests

echo "unit, golden, API and kernel tests done after $(( $(date +%s) - start )) s"

step "API tests on PostgreSQL"
# The same API, role and CLI suites, each server on its own database of the cluster (TLS with
# verify-full), plus the outage test (503 while PostgreSQL is down, then recovery).
pg_t=$(date +%s)
KLOIGOS_TEST_BACKEND=postgres KLOIGOS_REQUIRE_PRIVILEGED=1 \
  cargo test --locked --features test-hooks --test api --test roles --test cli --test pg_outage
pg_stop
echo "API tests on PostgreSQL done in $(( $(date +%s) - pg_t )) s"

step "dashboard in a browser (headless Chromium, playwright-core)"
tests/browser/run.sh

step "API fuzzing from the OpenAPI document (schemathesis)"
tests/fuzz/run.sh   # ends with 'fuzz: N passed, M failed'

if [[ ${KLOIGOS_SKIP_VM:-} != 1 ]]; then
  step "packages and end-to-end tests in a VM"
  tests/vm/e2e.sh   # ends with its own 'N passed, M failed' line
fi
