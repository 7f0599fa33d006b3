#!/usr/bin/env bash
# End-to-end tests of the Kloigos packages on a real systemd: builds the .deb twice (the second
# with a higher version, for the upgrade) and the .rpm, boots a throw-away Debian 12 VM (vm.sh),
# runs tests/vm/guest.sh's phases in it, reboots it in the middle, joins it to a hub running
# here (tests/vm/fleet.sh: PostgreSQL, a hub, Ansible; one more VM reboot), and prints each check
# with its time and a closing `N passed, M failed` line. Exits non-zero if any check failed.
set -uo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=../../scripts/lib/deps.sh
. scripts/lib/deps.sh
VM=tests/vm/vm.sh
LOG=target/e2e
mkdir -p "$LOG"
t_start=$EPOCHREALTIME
elapsed() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }
results=()
record() { results+=("$1 $2 $3 ${4:-}"); echo "RESULT $1 $2 $3 ${4:-}"; }
fatal() { echo "e2e: $*" >&2; record setup FAIL 0 "$*"; summary; exit 1; }
summary() {
  local pass=0 fail=0
  echo; echo "== end-to-end checks (seconds)"
  for r in "${results[@]}"; do
    read -r name verdict secs detail <<<"$r"
    printf '  %-28s %-4s %6ss %s\n' "$name" "$verdict" "$secs" "$detail"
    if [[ $verdict == PASS ]]; then pass=$((pass + 1)); else fail=$((fail + 1)); fi
  done
  echo "  total $(elapsed "$t_start") s"
  echo "e2e: $pass passed, $fail failed"
  ((fail == 0))
}
# shellcheck source=fleet.sh
. tests/vm/fleet.sh
trap 'fleet_cleanup; $VM down >/dev/null 2>&1 || true' EXIT

# ---- packages
t=$EPOCHREALTIME
rm -rf target/packages
scripts/package.sh >"$LOG/package.log" 2>&1 || { tail -30 "$LOG/package.log"; fatal "package build failed"; }
VERSION_SUFFIX=+up1 KLOIGOS_LINTIAN=0 scripts/package.sh >>"$LOG/package.log" 2>&1 || fatal "second package build failed"
record packages-build-lintian PASS "$(elapsed "$t")"

# The last version without a generator, for a real upgrade from it (guest.sh j-upgrade), built
# from its commit with that commit's own package.sh, reusing this build's compiled dependencies
# (hard links). A clone without that commit (shallow) skips this: j-upgrade then brings the
# host into the state that version leaves by hand.
PREGEN=aad1fc38310c296bc7685b8412833422ef72522f
if git cat-file -e "$PREGEN^{commit}" 2>/dev/null; then
  t=$EPOCHREALTIME
  old=target/pregen
  rm -rf "$old" && mkdir -p "$old/target/release"
  git archive "$PREGEN" | tar -x -C "$old" || fatal "cannot extract $PREGEN"
  cp -al target/release/deps target/release/build target/release/.fingerprint "$old/target/release/"
  (cd "$old" && VERSION_SUFFIX='~pregen1' KLOIGOS_LINTIAN=0 scripts/package.sh) >>"$LOG/package.log" 2>&1 \
    || fatal "building the pre-generator version $PREGEN failed"
  cp "$old"/target/packages/kloigos_*~pregen1_amd64.deb target/packages/ || fatal "no pre-generator .deb"
  rm -rf "$old"
  record package-pre-generator-version PASS "$(elapsed "$t")"
else
  echo "e2e: commit $PREGEN is not in this clone: j-upgrade simulates the pre-generator host"
fi

# RPM: no RPM-based VM here; check its file list and scriptlets.
t=$EPOCHREALTIME
deps_need rpm:rpm >>"$LOG/package.log" 2>&1 || fatal "cannot install rpm"
rpmf=$(ls target/packages/kloigos-*.rpm | grep -v '\.up1' | head -1)
list=$(rpm -qlp "$rpmf" 2>/dev/null); scripts=$(rpm -qp --scripts "$rpmf" 2>/dev/null)
missing=()
for f in /usr/bin/kloigos /usr/lib/systemd/system-generators/kloigos-generator /usr/lib/systemd/system/kloigos.socket /usr/lib/systemd/system/kloigos.service \
         /usr/lib/systemd/system/kloigos-nftables.service /usr/lib/kloigos/templates/nftables.nft \
         /usr/lib/sysusers.d/kloigos.conf /usr/lib/tmpfiles.d/kloigos.conf /etc/default/kloigos \
         /usr/lib/systemd/system-preset/50-kloigos.preset; do
  grep -qx "$f" <<<"$list" || missing+=("$f")
done
for s in 'postinstall scriptlet' 'systemctl --no-reload preset kloigos.socket' 'preuninstall scriptlet' \
         'disable --now kloigos.socket' 'postuninstall scriptlet' 'try-restart kloigos.service' 'systemd-sysusers' \
         'systemctl restart kloigos.service' 'still exist on this host'; do
  grep -qF "$s" <<<"$scripts" || missing+=("scriptlet: $s")
done
grep -qx 'systemd-pam' <<<"$(rpm -qpR "$rpmf" 2>/dev/null)" || missing+=("Requires: systemd-pam")
grep -qF 'start kloigos-nftables.service' <<<"$scripts" || missing+=("scriptlet: start kloigos-nftables.service")
if ((${#missing[@]})); then record rpm-files-scriptlets FAIL "$(elapsed "$t")" "missing: ${missing[*]}"
else record rpm-files-scriptlets PASS "$(elapsed "$t")"; fi

# ---- the VM
t=$EPOCHREALTIME
$VM image >"$LOG/image.log" 2>&1 || { tail -20 "$LOG/image.log"; fatal "VM image build failed"; }
record vm-image PASS "$(elapsed "$t")"
t=$EPOCHREALTIME
$VM up >"$LOG/up.log" 2>&1 || { tail -40 "$LOG/up.log"; fatal "VM did not boot"; }
record vm-boot PASS "$(elapsed "$t")"
$VM ssh 'mkdir -p /root/pkgs' && $VM put target/packages/. /root/pkgs/ && $VM put tests/vm/guest.sh /root/guest.sh \
  && $VM put tests/race/tenant.py /root/tenant.py \
  && $VM put scripts/lib/deps.sh /root/deps.sh \
  || fatal "cannot copy the packages into the VM"

phase() {
  local out
  out=$($VM ssh "bash /root/guest.sh $1" 2>&1)
  echo "$out" >>"$LOG/guest.log"
  while read -r _ name verdict secs detail; do
    record "$name" "$verdict" "$secs" "$detail"
  done < <(grep '^RESULT ' <<<"$out")
  grep -q '^RESULT ' <<<"$out" || record "phase-$1" FAIL 0 "no result (see $LOG/guest.log)"
}
: >"$LOG/guest.log"
phase before
phase install
phase units
phase latency
phase race
phase generator
phase upgrade
t=$EPOCHREALTIME
if $VM reboot >"$LOG/reboot.log" 2>&1; then
  record vm-reboot PASS "$(elapsed "$t")"
  phase reboot
else
  record vm-reboot FAIL "$(elapsed "$t")" "guest did not come back"
fi
# The fleet (tests/vm/fleet.sh): a hub here, the guest joined to it; ends with the guest's
# local server of the units phase set up again, for purge.
t=$EPOCHREALTIME
fleet_phase
echo "e2e: the fleet phase took $(elapsed "$t") s"
$VM ssh 'journalctl -b -u kloigos.service -u kloigos-pull.service --no-pager' >"$LOG/journal-fleet.log" 2>&1
phase purge
$VM ssh 'journalctl -b -u kloigos.service --no-pager' >"$LOG/journal.log" 2>&1
t=$EPOCHREALTIME
$VM down >/dev/null 2>&1
record vm-shutdown PASS "$(elapsed "$t")"
summary
