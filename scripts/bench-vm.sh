#!/usr/bin/env bash
# The VM part of the benchmark (issue 10): allocate -> ALLOCATED and deallocate on the real
# systemd of the test bed's Debian 12 VM (tests/vm/vm.sh, qemu in software mode), as the caller
# sees it, and what the pieces of an allocation cost there (tests/vm/guest.sh `latency`).
# Run by scripts/bench.sh when the VM image is already built (by the test suite's e2e step);
# prints `row|figure|measured|goal` lines (or a `note|...` saying why not) for benches/fleet.rs,
# which puts them in its table. Never fails on timing.
set -uo pipefail
cd "$(dirname "$0")/.."
VM=tests/vm/vm.sh
LOG=target/bench-vm
mkdir -p "$LOG"
: >"$LOG/guest.log"
say() { echo "note|VM part: $*"; }
if [[ ! -e ${KLOIGOS_VM_DIR:-/var/tmp/kloigos-vm}/base/stamp ]] || ! command -v qemu-system-x86_64 >/dev/null; then
  say "skipped: no VM image (run the test suite, or tests/vm/vm.sh image, first)"
  exit 0
fi
t0=$EPOCHREALTIME
KLOIGOS_LINTIAN=0 scripts/package.sh >"$LOG/package.log" 2>&1 || { say "skipped: package build failed (see $LOG/package.log)"; exit 0; }
trap '$VM down >/dev/null 2>&1 || true' EXIT
$VM up >"$LOG/up.log" 2>&1 || { say "skipped: the VM did not boot (see $LOG/up.log)"; exit 0; }
$VM ssh 'mkdir -p /root/pkgs' && $VM put target/packages/. /root/pkgs/ && $VM put tests/vm/guest.sh /root/guest.sh \
  && $VM put scripts/lib/deps.sh /root/deps.sh || { say "skipped: cannot copy into the VM"; exit 0; }
for phase in bench-setup latency; do
  out=$($VM ssh "bash /root/guest.sh $phase" 2>&1)
  echo "$out" >>"$LOG/guest.log"
  if grep -q "^RESULT [^ ]* FAIL" <<<"$out"; then
    say "phase $phase failed: $(grep '^RESULT [^ ]* FAIL' <<<"$out" | head -3 | cut -c1-400)"
    exit 0
  fi
done
# The latency phase's figures, as `row|figure|measured|goal` for benches/fleet.rs.
grep '^BENCH|' "$LOG/guest.log" | sed 's/^BENCH|/row|/'
echo "row|VM: whole VM part (package build, boot, install, 40 calls)|$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.0f", b - a }') s|"
echo "note|VM figures: the test bed's Debian 12 VM under qemu in software mode (TCG, ${VM_CPUS:-4} vCPUs on this machine's $(nproc) CPUs): every instruction is emulated, so each figure is many times what the same systemd does on hardware; the process-start and loginctl rows say what the pieces cost there."
