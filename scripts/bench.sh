#!/usr/bin/env bash
# The fleet benchmark (issues 9 and 10): list latency at 1k/10k/100k units on SQLite (one host)
# and PostgreSQL (two hubs), allocations per second on a fleet of 50 joined hosts, peak RSS.
# Prints one markdown table; never fails on timing (goals are printed next to the figures).
#
#   sudo scripts/bench.sh            # as root: the hosts' fake roots must be root-owned
#
# Knobs (see benches/fleet.rs): KLOIGOS_BENCH_SIZES, KLOIGOS_BENCH_RUNS, KLOIGOS_BENCH_HOSTS,
# KLOIGOS_BENCH_CPUS, KLOIGOS_BENCH_CLIENTS, KLOIGOS_BENCH_FILL_CLIENTS,
# KLOIGOS_BENCH_FILL_BUDGET, KLOIGOS_BENCH_PHASES (sqlite,pg,fleet), KLOIGOS_BENCH_VM (0: no VM
# part; it runs only where the test suite has built the VM image).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/deps.sh
. scripts/lib/pg.sh

# wrk: the filtered lists' requests per second, as issue 10 measured them.
deps_need wrk:wrk systemd-socket-activate:systemd
cargo build --release --quiet
# The bench profile inherits the release one: this reuses the build above.
cargo bench --quiet --bench fleet --no-run
# The VM part first, on its own (qemu in software mode takes every CPU it gets); its rows join
# the table. KLOIGOS_BENCH_VM=0 skips it.
vm_rows=$PWD/target/bench-vm.rows
if [[ ${KLOIGOS_BENCH_VM:-1} != 0 ]]; then
  echo "bench: the VM part (scripts/bench-vm.sh)" >&2
  scripts/bench-vm.sh >"$vm_rows" 2>/dev/null || true
else
  echo "note|VM part: skipped (KLOIGOS_BENCH_VM=0)" >"$vm_rows"
fi
export KLOIGOS_BENCH_VM_ROWS=$vm_rows
pg_start
trap pg_stop EXIT
# More connections than the tests need: two hubs' pools, plus the fleet's.
ulimit -n 65536 2>/dev/null || true
KLOIGOS_BENCH_BIN=$PWD/target/release/kloigos cargo bench --quiet --bench fleet
