# shellcheck shell=bash
# The fleet phase of tests/vm/e2e.sh (sourced by it; uses its $VM, $LOG, record, elapsed, phase):
# a hub on this machine (PostgreSQL from scripts/lib/pg.sh, `target/release/kloigos serve` on
# 127.0.0.1:HUB_PORT), the VM joined to it through qemu's user network (the guest reaches this
# machine's loopback as 10.0.2.2; the hub pokes the guest through vm.sh's second forward,
# 127.0.0.1:VM_POKE_PORT -> guest :8000), then init_server, allocate (ssh and Ansible as the unit's
# user), deallocate through the hub, a deallocation made while the VM is off and caught up after
# it boots, and the hub's decommission. Guest-side steps: tests/vm/guest.sh fleet-*.
#
#   fleet_phase     runs every check (RESULT f1-... to f9-..., and the guest's o-, p-, q-, v-)
#   fleet_cleanup   stops the hub and PostgreSQL, removes the temporary directory (EXIT trap)

FLEET_DIR= HUB_PID= HUB_PORT= HUB_TOKEN= HUB_CODE= HUB_BODY=

hub_stop() {
  if [[ -n ${HUB_PID:-} ]]; then
    kill "$HUB_PID" 2>/dev/null
    wait "$HUB_PID" 2>/dev/null
    HUB_PID=
  fi
}

fleet_cleanup() {
  hub_stop
  if declare -F pg_stop >/dev/null; then pg_stop; fi
  [[ -n ${FLEET_DIR:-} ]] && rm -rf "$FLEET_DIR"
  FLEET_DIR=
}

# hub_start APPLY_TIMEOUT: (re)start the hub, wait until it answers
hub_start() {
  hub_stop
  echo "==== hub start $(date -Is), --apply-timeout $1" >>"$LOG/hub.log"
  "$KLOIGOS" serve --db "$FLEET_DB" --root "$FLEET_DIR/root" --hostname cihub --templates /nonexistent \
    --listen "127.0.0.1:$HUB_PORT" --tokens "$FLEET_DIR/tokens" --allowed-hosts 10.0.2.2 \
    --apply-timeout "$1" >>"$LOG/hub.log" 2>&1 &
  HUB_PID=$!
  local i
  for i in $(seq 150); do
    curl -sf -o /dev/null --max-time 2 "http://127.0.0.1:$HUB_PORT/healthz" && return 0
    kill -0 "$HUB_PID" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

# hub METHOD PATH [JSON]: the admin's request to the hub; sets HUB_CODE and HUB_BODY
hub() {
  local args=(-s -o "$FLEET_DIR/body" -w '%{http_code}' --max-time 200 -X "$1" -H "Authorization: Bearer $HUB_TOKEN")
  [[ -n ${3:-} ]] && args+=(-H 'content-type: application/json' --data "$3")
  rm -f "$FLEET_DIR/body"
  HUB_CODE=$(curl "${args[@]}" "http://127.0.0.1:$HUB_PORT$2") || HUB_CODE=${HUB_CODE:-000}
  HUB_BODY=$(cat "$FLEET_DIR/body" 2>/dev/null)
}

ffails=()
fexpect() { [[ "$2" == "$3" ]] || ffails+=("$1: got '$2', want '$3'"); }
fexpect_match() { [[ "$2" =~ $3 ]] || ffails+=("$1: got '$2', want /$3/"); }
ffinish() { # ffinish NAME T0 [NOTE]
  local d
  if ((${#ffails[@]} == 0)); then
    record "$1" PASS "$(elapsed "$2")" "${3:-}"
  else
    d=$(IFS='; '; echo "${ffails[*]}")
    record "$1" FAIL "$(elapsed "$2")" "${d//$'\n'/ | }"
  fi
  ffails=()
}

# unit_status COMPUTE_ID: the hub's status of a unit
unit_status() { hub GET "/api/compute_units/$1"; jq -r .status <<<"$HUB_BODY" 2>/dev/null; }

fleet_phase() {
  local t guest_cpus cid user cpus uid range code out rc cidb userb t_down t_boot
  KLOIGOS=$PWD/target/release/kloigos
  POKE_PORT=${VM_POKE_PORT:-2280}
  FLEET_DIR=$(mktemp -d "${TMPDIR:-/tmp}/kloigos-fleet.XXXXXX")
  : >"$LOG/hub.log"; : >"$LOG/fleet.log"

  # ---- f1. the hub on this machine, on PostgreSQL; reachable from the guest as 10.0.2.2
  t=$EPOCHREALTIME
  # shellcheck source=../../scripts/lib/pg.sh
  . scripts/lib/pg.sh
  if ! pg_start >>"$LOG/fleet.log" 2>&1; then
    record f1-hub-on-ci-machine FAIL "$(elapsed "$t")" "PostgreSQL did not start (see $LOG/fleet.log)"; return
  fi
  psql -q "$KLOIGOS_TEST_PG/postgres?sslmode=verify-full&sslrootcert=$KLOIGOS_TEST_PG_CA" -c 'CREATE DATABASE fleet' >>"$LOG/fleet.log" 2>&1
  FLEET_DB="$KLOIGOS_TEST_PG/fleet?sslmode=verify-full&sslrootcert=$KLOIGOS_TEST_PG_CA"
  # The hub's own root: never applied to (it has no server), only its lock lives there.
  mkdir -p "$FLEET_DIR/root/etc/skel" "$FLEET_DIR/root/run/kloigos"
  echo cihub >"$FLEET_DIR/root/etc/hostname"
  HUB_TOKEN=$("$KLOIGOS" token --tokens "$FLEET_DIR/tokens" create --name e2e-admin --role admin 2>>"$LOG/fleet.log")
  (umask 077; "$KLOIGOS" token --tokens "$FLEET_DIR/tokens" create --name e2e-ansible --role readonly \
    >"$FLEET_DIR/ansible-token" 2>>"$LOG/fleet.log")
  HUB_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  if ! hub_start 90; then
    tail -20 "$LOG/hub.log"
    record f1-hub-on-ci-machine FAIL "$(elapsed "$t")" "the hub did not start (see $LOG/hub.log)"; return
  fi
  fexpect "admin token made" "$([[ -n $HUB_TOKEN ]] && echo yes)" yes
  # The Host rule matches names on any port: 10.0.2.2:PORT passes, another name does not.
  code=$(curl -s -o /dev/null -w '%{http_code}' -H "Host: 10.0.2.2:$HUB_PORT" "http://127.0.0.1:$HUB_PORT/healthz")
  fexpect "Host: 10.0.2.2:PORT accepted" "$code" 200
  code=$(curl -s -o /dev/null -w '%{http_code}' -H "Host: evil.example:$HUB_PORT" "http://127.0.0.1:$HUB_PORT/healthz")
  fexpect "another Host refused" "$code" 403
  fexpect_match "the guest reaches the hub" "$($VM ssh "curl -s --max-time 10 http://10.0.2.2:$HUB_PORT/healthz" 2>&1)" '"status":"ok"'
  GUEST=$($VM ssh hostname 2>/dev/null)
  fexpect_match "guest hostname" "$GUEST" '^[a-z0-9.-]+$'
  ffinish f1-hub-on-ci-machine "$t" "hub 127.0.0.1:$HUB_PORT on PostgreSQL (TLS verify-full)"

  # ---- f2. pokes reach the guest: 127.0.0.1:POKE_PORT -> guest :8000 -> kloigos.socket
  phase fleet-prepare
  t=$EPOCHREALTIME
  out=$(curl -s -X POST --max-time 30 "http://127.0.0.1:$POKE_PORT/api/host/poke")
  fexpect_match "a poke through the forward (not joined yet: 404)" "$out" 'this host has not joined a hub'
  ffinish f2-pokes-reach-the-guest "$t"

  # ---- f3. join: the hub makes the host's token, the guest joins with it
  t=$EPOCHREALTIME
  hub POST /api/admin/hosts "{\"hostname\": \"$GUEST\"}"
  fexpect "POST /api/admin/hosts" "$HUB_CODE" 201
  (umask 077; jq -r .token <<<"$HUB_BODY" >"$FLEET_DIR/host-token")
  fexpect_match "host token" "$(cat "$FLEET_DIR/host-token")" '^kh_[A-Za-z0-9_-]{43}$'
  $VM put "$FLEET_DIR/host-token" /root/host-token && $VM ssh 'chmod 600 /root/host-token' \
    || ffails+=("cannot copy the token into the guest")
  ffinish f3-hub-makes-host-token "$t"
  phase "fleet-join http://10.0.2.2:$HUB_PORT http://127.0.0.1:$POKE_PORT/api/host/poke"
  t=$EPOCHREALTIME
  guest_cpus=$($VM ssh 'cat /sys/devices/system/cpu/online' 2>/dev/null)
  hub GET /api/admin/hosts
  fexpect "GET /api/admin/hosts" "$HUB_CODE" 200
  fexpect "host joined, with the guest's cpus_online and poke URL" \
    "$(jq -r --arg h "$GUEST" '.[] | select(.hostname == $h) | "\(.joined) \(.facts.cpus_online) \(.poke_url)"' <<<"$HUB_BODY" 2>&1)" \
    "true $guest_cpus http://127.0.0.1:$POKE_PORT/api/host/poke"
  fexpect_match "a report arrived" "$(jq -r --arg h "$GUEST" '.[] | select(.hostname == $h) | .last_report_at' <<<"$HUB_BODY" 2>&1)" '^20'
  fexpect_match "a poke through the forward now: 202" "$(curl -s -X POST --max-time 30 "http://127.0.0.1:$POKE_PORT/api/host/poke")" 'pull scheduled'
  ffinish f3-hub-sees-joined-host "$t"

  # ---- f4. init_server through the hub: 200 only once the guest applied it
  t=$EPOCHREALTIME
  hub POST /api/admin/init_server "{\"hostname\": \"$GUEST\", \"ip\": \"127.0.0.1\", \"region\": \"vm\", \"zone\": \"fleet\", \"cpu_ranges\": [\"0-1\", \"2-3\"]}"
  fexpect "init_server" "$HUB_CODE $HUB_BODY" "200 {}"
  local t_init; t_init=$(elapsed "$t")
  hub GET /api/admin/servers
  fexpect "server READY, joined host" \
    "$(jq -r --arg h "$GUEST" '.[] | select(.hostname == $h) | "\(.status) \(.inventory_only) \(.host.joined)"' <<<"$HUB_BODY" 2>&1)" "READY false true"
  ffinish f4-init-server-through-hub "$t" "answered in $t_init s"
  phase fleet-server

  # ---- f5. allocate through the hub: ssh as the unit's user, in its slice, on its CPUs
  t=$EPOCHREALTIME
  ssh-keygen -q -t ed25519 -N '' -C fleet-e2e -f "$FLEET_DIR/key"
  ssh-keygen -q -t ed25519 -N '' -C fleet-e2e-other -f "$FLEET_DIR/other"
  hub POST /api/compute_units/allocate \
    "{\"cpu_count\": 2, \"ssh_public_key\": \"$(cat "$FLEET_DIR/key.pub")\", \"tags\": {\"deployment_id\": \"fleet-e2e\", \"groups\": [\"web\"]}}"
  fexpect "allocate" "$HUB_CODE" 200
  local t_alloc; t_alloc=$(elapsed "$t")
  cid=$(jq -r .compute_id <<<"$HUB_BODY" 2>/dev/null) user=$(jq -r .user <<<"$HUB_BODY" 2>/dev/null)
  cpus=$(jq -r .cpu_count <<<"$HUB_BODY" 2>/dev/null) uid=$(jq -r .uid <<<"$HUB_BODY" 2>/dev/null)
  range=$(jq -r .cpu_range <<<"$HUB_BODY" 2>/dev/null)
  fexpect "ALLOCATED" "$(jq -r .status <<<"$HUB_BODY" 2>/dev/null)" ALLOCATED
  out=$($VM ssh-user "$user" "$FLEET_DIR/key" 'id -un; nproc; cat /proc/self/cgroup' 2>&1)
  fexpect "ssh as the unit's user" "$(sed -n 1p <<<"$out")" "$user"
  fexpect "nproc = cpu_count" "$(sed -n 2p <<<"$out")" "$cpus"
  fexpect_match "in the unit's slice" "$(sed -n 3p <<<"$out")" "^0::/user.slice/user-$uid.slice/session-[0-9]+.scope$"
  $VM ssh-user "$user" "$FLEET_DIR/other" true >/dev/null 2>&1
  fexpect "another key refused" "$?" 255
  ffinish f5-allocate-through-hub "$t" "$cid answered in $t_alloc s"

  # ---- f6. Ansible over `kloigos inventory` (the hub, a readonly token), as the unit's user
  t=$EPOCHREALTIME
  mkdir -p "$FLEET_DIR/ansible"
  # (Ansible refuses a locale that is not UTF-8; deps.sh sets LC_ALL=C.)
  out=$(LC_ALL=C.UTF-8 PATH=$PWD/target/release:$PATH KLOIGOS_URL="http://127.0.0.1:$HUB_PORT" \
    KLOIGOS_TOKEN_FILE="$FLEET_DIR/ansible-token" ANSIBLE_HOME="$FLEET_DIR/ansible" \
    ANSIBLE_LOCAL_TEMP="$FLEET_DIR/ansible/tmp" ANSIBLE_HOST_KEY_CHECKING=False ANSIBLE_NOCOLOR=1 \
    ANSIBLE_SSH_ARGS='-o UserKnownHostsFile=/dev/null -o IdentitiesOnly=yes -o IdentityAgent=none -o ControlMaster=auto -o ControlPersist=60s' \
    ansible-playbook -i packaging/ansible/kloigos-inventory tests/vm/fleet-play.yml \
      -e ansible_port="${VM_SSH_PORT:-2222}" -e ansible_python_interpreter=/usr/bin/python3 \
      --private-key "$FLEET_DIR/key" 2>&1)
  rc=$?
  echo "$out" >"$LOG/ansible.log"
  fexpect "ansible-playbook" "$rc" 0
  fexpect_match "played on the unit, nothing failed" "$(grep -E "^$cid +:" <<<"$out")" 'ok=[1-9][0-9]* .*failed=0'
  fexpect "one host in the inventory" "$(grep -cE '^[^ ]+ +: ok=' <<<"$out")" 1
  fexpect "the file it wrote, owned by the unit's user" \
    "$($VM ssh "stat -c '%U %a' /opt/c$range/ansible.txt" 2>&1)" "$user 640"
  ((${#ffails[@]} == 0)) || tail -25 <<<"$out"
  ffinish f6-ansible-as-unit-user "$t"

  # ---- f7. deallocate through the hub: the unit cleaned as on a single host
  t=$EPOCHREALTIME
  $VM ssh-user "$user" "$FLEET_DIR/key" 'nohup sleep 1000 </dev/null >/dev/null 2>&1 & echo x >/mnt/c'"$range"'/data; mkdir -p ~/.config/app' >/dev/null 2>&1
  fexpect_match "the user has processes before" "$($VM ssh "pgrep -u $user -c" 2>&1)" '^[1-9]'
  hub DELETE "/api/compute_units/deallocate/$cid"
  fexpect "deallocate" "$HUB_CODE $HUB_BODY" "200 {}"
  fexpect "FREE at the hub" "$(unit_status "$cid")" FREE
  ffinish f7-deallocate-through-hub "$t"
  phase "fleet-released $user f7-released-on-guest"

  # ---- f8. a deallocation while the VM is off, caught up after it boots
  t=$EPOCHREALTIME
  hub POST /api/compute_units/allocate \
    "{\"cpu_count\": 2, \"ssh_public_key\": \"$(cat "$FLEET_DIR/other.pub")\", \"tags\": {\"deployment_id\": \"fleet-e2e-b\"}}"
  fexpect "allocate B" "$HUB_CODE" 200
  cidb=$(jq -r .compute_id <<<"$HUB_BODY" 2>/dev/null) userb=$(jq -r .user <<<"$HUB_BODY" 2>/dev/null)
  $VM ssh-user "$userb" "$FLEET_DIR/other" 'systemd-run --user --unit=e2e-b sleep 1000' >/dev/null 2>&1
  fexpect_match "B has a user service before" "$($VM ssh "pgrep -u $userb -c" 2>&1)" '^[1-9]'
  t_down=$EPOCHREALTIME
  $VM down >>"$LOG/fleet.log" 2>&1
  # A short apply timeout for the request made while the guest is off (its poke fails at once;
  # the hub waits the timeout for a report that cannot come).
  hub_start 10 || ffails+=("hub restart with --apply-timeout 10 failed")
  hub DELETE "/api/compute_units/deallocate/$cidb"
  local while_off="HTTP $HUB_CODE $(jq -r .detail <<<"$HUB_BODY" 2>/dev/null)"
  fexpect_match "deallocate while the VM is off: not 200" "$HUB_CODE" '^(503|504)$'
  fexpect_match "... the host releases it when it pulls" "$HUB_BODY" 'next pulls'
  fexpect "... DEALLOCATION_FAIL meanwhile" "$(unit_status "$cidb")" DEALLOCATION_FAIL
  # Back to the long timeout before the guest can report again (a restart while it pulls
  # would only delay the catch-up to the next timer run).
  hub_start 90 || ffails+=("hub restart with --apply-timeout 90 failed")
  t_boot=$EPOCHREALTIME
  if ! $VM reboot >>"$LOG/fleet.log" 2>&1; then
    ffails+=("the VM did not boot again on its disk")
  fi
  local booted; booted=$(elapsed "$t_boot")
  local end=$((SECONDS + 150)) guest_ok=no hub_ok=no
  while ((SECONDS < end)); do
    [[ $guest_ok == no ]] && $VM ssh "test ! -s /home/$userb/.ssh/authorized_keys && ! pgrep -u $userb >/dev/null" 2>/dev/null \
      && guest_ok=$(elapsed "$t_boot")
    [[ $hub_ok == no && $(unit_status "$cidb") == FREE ]] && hub_ok=$(elapsed "$t_boot")
    [[ $guest_ok != no && $hub_ok != no ]] && break
    sleep 2
  done
  fexpect_match "the guest released B after booting (s after boot start)" "$guest_ok" '^[0-9.]+$'
  fexpect_match "the hub shows B FREE (s after boot start)" "$hub_ok" '^[0-9.]+$'
  ffinish f8-catch-up-after-reboot "$t" "while off: $while_off; down+boot $(elapsed "$t_down") s (boot $booted s); released on guest at +$guest_ok s, FREE at hub at +$hub_ok s after boot start"
  phase "fleet-released $userb f8-released-after-reboot"

  # ---- f9. decommission through the hub: the guest tears its server down
  t=$EPOCHREALTIME
  hub DELETE "/api/admin/decommission_server/$GUEST"
  fexpect "decommission" "$HUB_CODE $HUB_BODY" "200 {}"
  hub GET /api/admin/servers
  fexpect "DECOMMISSIONED at the hub" \
    "$(jq -r --arg h "$GUEST" '.[] | select(.hostname == $h) | .status' <<<"$HUB_BODY" 2>&1)" DECOMMISSIONED
  ffinish f9-decommission-through-hub "$t"
  phase fleet-leave
  fleet_cleanup
}
