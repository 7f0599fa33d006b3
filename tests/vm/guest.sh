#!/usr/bin/env bash
# Runs INSIDE the test VM as root: the end-to-end checks of Kloigos on a real systemd host.
# Each check prints one line `RESULT <name> PASS|FAIL <seconds> <detail>`; checks assert the real
# effect (a process's affinity, a refused connection, a missing file), not an exit code alone.
#
#   guest.sh before      snapshot the host before Kloigos is installed
#   guest.sh install     a. install the .deb, socket activation, STATUS=, idle exit
#   guest.sh units       b-g. init_server, ssh, CPUs and limits, ports, nftables restart, files,
#                        deallocation
#   guest.sh race        k. a hostile tenant (tests/race/tenant.py) against reconcile and reallocation
#   guest.sh generator   l-n. the generator's drop-ins, an admin's drop-in wins, a user service
#                        enabled to report its CPUs at the next boot
#   guest.sh upgrade     j. upgrade from a version without a generator (run before the reboot)
#   guest.sh reboot      n. limits from the first second of a boot, before kloigos.service runs;
#                        h. after a reboot: slices, nftables, allocations; nftables restart
#   guest.sh fleet-prepare        o. (the fleet phase, driven by e2e.sh through tests/vm/fleet.sh)
#                                 decommission the local server; kloigos.socket also on the
#                                 guest's address (qemu forwards the hub's pokes there)
#   guest.sh fleet-join HUB POKE  p. kloigos join with /root/host-token
#   guest.sh fleet-server         q. the server the hub asked for: users, slices, nft table
#   guest.sh fleet-released USER [NAME]  the unit of USER released (no key, no process,
#                                 home back to the skeleton, empty dirs)
#   guest.sh fleet-leave          v. after the hub's decommission: users gone; leave the hub and
#                                 set the units phase's local server up again for purge
#   guest.sh purge       i0. apt remove with units, reinstall; i. decommission, apt purge: the
#                        host is as before, no Kloigos drop-in loaded
set -u
export LC_ALL=C
# apt-get through the project's helper (waits for the dpkg lock: apt-daily may run at boot)
# shellcheck source=../../scripts/lib/deps.sh
. /root/deps.sh
PKGS=/root/pkgs
KEYS=/root/keys
SNAP=/root/snapshot
# Test helpers every user can read, outside /tmp (cleaned at boot).
E2E=/usr/local/share/kloigos-e2e
HOST=$(hostname)
U0=u0 U1=u1 UID0=20000 UID1=20001
UIDS="20000 20001 20002 20003"
GEN=/usr/lib/systemd/system-generators/kloigos-generator
STATE=/etc/kloigos/host.json
GENDIR=/run/systemd/generator

t0=0
start() { t0=$EPOCHREALTIME; }
secs() { awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }
result() { local d=${3:-}; echo "RESULT $1 $2 $(secs) ${d//$'\n'/ | }"; }   # one line per check
# check NAME CONDITION-OUTPUT: PASS when the accumulated failures list is empty.
fails=()
expect() { # expect DESCRIPTION ACTUAL WANTED
  if [[ "$2" != "$3" ]]; then fails+=("$1: got '$2', want '$3'"); fi
}
expect_match() { # expect_match DESCRIPTION ACTUAL REGEX
  if ! [[ "$2" =~ $3 ]]; then fails+=("$1: got '$2', want /$3/"); fi
}
finish() { # finish NAME
  if ((${#fails[@]} == 0)); then result "$1" PASS; else result "$1" FAIL "$(IFS='; '; echo "${fails[*]}")"; fi
  fails=()
}

as_user() { # as_user USER KEY CMD: a real ssh login of the unit's user
  ssh -q -i "$KEYS/$2" -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
    -o ConnectTimeout=5 "$1@127.0.0.1" "$3"
}

wait_for() { # wait_for SECONDS CMD...
  local end=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do ((SECONDS < end)) || return 1; sleep 0.5; done
}

snapshot() {
  {
    echo "## passwd"; getent passwd | cut -d: -f1,3 | sort
    echo "## group"; getent group | cut -d: -f1,3 | sort
    echo "## systemd"; find /etc/systemd/system -name '*kloigos*' -o -name 'user-*.slice.d' -o -name 'user@*.service.d' | sort
    echo "## generator"; find /usr/lib/systemd/system-generators $GENDIR -name '*kloigos*' 2>/dev/null | sort
    echo "## tmpfiles"; ls /etc/tmpfiles.d | sort
    echo "## dirs"; ls -d /opt/* /mnt/* /home/* /var/lib/kloigos /etc/kloigos 2>/dev/null | sort
    echo "## linger"; ls /var/lib/systemd/linger 2>/dev/null | sort
    echo "## nft"; nft list tables | sort
  }
}

curl_api() { curl -s --max-time 30 "$@"; }

# What systemd has loaded for a unit's slice: CPUs and limits (one line), and the drop-ins.
limits_of() { systemctl show -p AllowedCPUs -p TasksMax -p MemoryMax --value "user-$1.slice" | paste -sd' '; }
dropins() { systemctl show -p DropInPaths --value "$@" | tr ' ' '\n' | grep .; }
# The Kloigos drop-ins systemd has loaded for the units' slices and user managers.
loaded_kloigos_dropins() {
  local uid
  for uid in $UIDS; do dropins "user-$uid.slice" "user@$uid.service"; done | grep kloigos
}
# Every 0.1 s until STOPFILE exists: the limits the kernel applies to the active slices of UIDs.
# (Builtins only: a fork costs tens of milliseconds under TCG.)
sample_limits() { # sample_limits OUT STOPFILE UID...
  local out=$1 stop=$2 uid d cpus pids mem tick
  shift 2
  exec {tick}<> <(:)   # a pipe nobody writes to: `read -t` on it is a sleep without a fork
  while [[ ! -e $stop ]]; do
    for uid in "$@"; do
      d=/sys/fs/cgroup/user.slice/user-$uid.slice
      cpus=gone pids=gone mem=gone
      { read -r cpus <"$d/cpuset.cpus" && read -r pids <"$d/pids.max" && read -r mem <"$d/memory.max"; } 2>/dev/null
      echo "$uid cpus=$cpus pids=$pids mem=$mem"
    done
    read -r -t 0.1 -u "$tick" || true
  done >"$out"
  exec {tick}>&-
}

case ${1:-} in
before)
  mkdir -p "$KEYS"
  for k in k1 k2 k3 k4 other; do [[ -f $KEYS/$k ]] || ssh-keygen -q -t ed25519 -N '' -C "$k@test" -f "$KEYS/$k"; done
  # An admin's firewall is part of the host before Kloigos (the reboot phase restarts it).
  systemctl start nftables.service
  snapshot >"$SNAP.before"
  # The image is a minimal Debian without libpam-systemd (the package must bring it in): the
  # package's own `kloigos doctor`, run from the unpacked .deb, must see that SSH logins would
  # not land in a user's slice.
  start
  deb=$(ls $PKGS/kloigos_*_amd64.deb | grep -v -e '+up' -e '~pregen' | head -1)
  rm -rf /root/unpacked && dpkg-deb -x "$deb" /root/unpacked
  expect "pam_systemd.so not installed" "$(ls /{usr/,}lib/x86_64-linux-gnu/security/pam_systemd.so 2>/dev/null)" ""
  out=$(/root/unpacked/usr/bin/kloigos doctor 2>&1); rc=$?
  expect "doctor fails" "$rc" 1
  expect_match "doctor names pam_systemd" "$out" 'FAIL pam-systemd: pam_systemd.so is not in sshd.s PAM session stack'
  expect_match "doctor sees UsePAM yes" "$out" 'ok   sshd-usepam: UsePAM yes'
  finish 0-doctor-before-install
  ;;

install)
  start
  deb=$(ls $PKGS/kloigos_*_amd64.deb | grep -v -e '+up' -e '~pregen' | head -1)
  # apt brings in what the package depends on (libpam-systemd) from the image's Debian mirror,
  # reached through qemu's user network; the lists debootstrap left are refreshed only if needed.
  out=$(deps_apt install -y "$deb" 2>&1) || out=$(deps_apt update 2>&1 && deps_apt install -y "$deb" 2>&1)
  rc=$?
  expect "apt install" "$rc" 0
  [[ $rc == 0 ]] || echo "$out" | tail -20
  expect "socket enabled" "$(systemctl is-enabled kloigos.socket)" enabled
  expect "socket active" "$(systemctl is-active kloigos.socket)" active
  expect "service inactive before the first request" "$(systemctl is-active kloigos.service)" inactive
  expect "group kloigos" "$(getent group kloigos | cut -d: -f1)" kloigos
  expect "libpam-systemd came with the package" "$(dpkg-query -W -f '${db:Status-Status}' libpam-systemd 2>&1)" installed
  out=$(kloigos doctor 2>&1)
  expect "kloigos doctor passes after install" "$?" 0
  expect_match "doctor: pam_systemd reached" "$out" 'ok   pam-systemd: session stack sshd -> common-session reaches'
  # Active before any table exists, so PartOf=nftables.service has a unit to restart.
  expect "kloigos-nftables.service active at install" "$(systemctl is-active kloigos-nftables.service)" active
  expect "no table yet" "$(nft list tables | grep -c kloigos)" 0
  # Short idle time for the test; the conffile is kept on upgrade with --force-confold.
  sed -i 's/^KLOIGOS_IDLE_TIMEOUT=.*/KLOIGOS_IDLE_TIMEOUT=5/' /etc/default/kloigos
  cli=$(kloigos servers 2>&1); rc=$?
  expect "first request (CLI over the unix socket)" "$rc" 0
  expect_match "CLI table" "$cli" '^HOSTNAME'
  expect "service started by the socket" "$(systemctl is-active kloigos.service)" active
  expect_match "STATUS= line" "$(systemctl show -p StatusText --value kloigos.service)" 'listening on .*kloigos.sock'
  expect_match "systemctl status shows it" "$(systemctl status kloigos.service --no-pager 2>&1 | grep -i 'Status:')" 'units, 0 allocated'
  expect_match "curl over TCP" "$(curl_api http://127.0.0.1:8000/healthz)" '"status":"ok"'
  wait_for 20 bash -c '[[ $(systemctl is-active kloigos.service) == inactive ]]'
  expect "service idle-exits" "$(systemctl is-active kloigos.service)" inactive
  expect "socket still listening" "$(systemctl is-active kloigos.socket)" active
  expect_match "next request starts it again" "$(curl_api http://127.0.0.1:8000/healthz)" '"status":"ok"'
  expect "service runs again" "$(systemctl is-active kloigos.service)" active
  expect_match "journal has structured logs" "$(journalctl -u kloigos.service -o verbose --no-pager 2>/dev/null | grep -c 'SYSLOG_IDENTIFIER=kloigos')" '^[1-9]'
  finish a-install-socket-activation

  # ---- a2. the installed service's own bounds, inside its sandbox: the fd limit, and a local
  # user holding many slow TCP connections caps only itself (the kernel names the caller of a
  # loopback connection through sock_diag), so a token holder running as root still gets answers.
  start
  expect "LimitNOFILE" "$(systemctl show -p LimitNOFILE --value kloigos.service)" 65536
  tok=$(kloigos token create --name e2e-a2 --role admin 2>&1)
  install -d -m 755 $E2E
  cat >$E2E/hold.py <<'PY'
import socket, sys, time
held = []
for _ in range(int(sys.argv[1])):
    s = socket.create_connection(("127.0.0.1", 8000))
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never ends its head
    held.append(s)
time.sleep(1)
refused = 0
for s in held:  # a connection over the caps was answered 503 and closed at once
    s.setblocking(False)
    try:
        refused += s.recv(64).startswith(b"HTTP/1.1 503")
    except BlockingIOError:
        pass
print("holding", len(held) - refused, "refused", refused, flush=True)
time.sleep(float(sys.argv[2]))
PY
  chmod 755 $E2E/hold.py
  since=$(date '+%Y-%m-%d %H:%M:%S')
  runuser -u nobody -- python3 $E2E/hold.py 40 8 >/tmp/hold.out 2>&1 &
  hold=$!
  wait_for 10 grep -q holding /tmp/hold.out
  t1=$EPOCHREALTIME
  code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 -H "Authorization: Bearer $tok" http://127.0.0.1:8000/api/whoami)
  took=$(awk -v a="$t1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
  expect "nobody capped at its own 32 connections" "$(cat /tmp/hold.out)" "holding 32 refused 8"
  expect "root's token answered while nobody holds its connections" "$code" 200
  expect "within 2 s" "$(awk -v t="$took" 'BEGIN { print (t < 2) ? "yes" : "no (" t " s)" }')" yes
  kill $hold 2>/dev/null; wait $hold 2>/dev/null
  expect "the caller's uid was known" "$(journalctl -u kloigos.service --since "$since" --no-pager 2>/dev/null | grep -ci 'cannot tell which local user')" 0
  kloigos token revoke e2e-a2 >/dev/null 2>&1
  finish a2-service-bounds
  ;;

units)
  # ---- b. init_server for this VM, one unit per CPU, with limits
  start
  ip=$(ip -4 -o addr show scope global | awk '{print $4}' | cut -d/ -f1 | head -1)
  # Refused while SSH logins would bypass pam_systemd (a drop-in read before UsePAM yes).
  echo 'UsePAM no' >/etc/ssh/sshd_config.d/00-e2e-nopam.conf
  out=$(kloigos init-server --hostname "$HOST" --ip "${ip:-127.0.0.1}" --region test --zone vm 0 1 2 3 2>&1)
  expect_match "init-server refused without UsePAM" "$out" 'would not land in their slice.*UsePAM no.*HTTP 409'
  expect "nothing created by the refused init" "$(getent passwd u0)" ""
  rm -f /etc/ssh/sshd_config.d/00-e2e-nopam.conf
  out=$(kloigos init-server --hostname "$HOST" --ip "${ip:-127.0.0.1}" --region test --zone vm \
        --limits '{"tasks_max": 64, "memory_max_per_cpu": 268435456}' 0 1 2 3 2>&1)
  expect "init-server" "$?" 0
  for i in 0 1 2 3; do
    expect "user u$i" "$(getent passwd u$i | cut -d: -f3,6)" "$((20000 + i)):/home/u$i"
    expect "AllowedCPUs of user-$((20000 + i)).slice" "$(systemctl show -p AllowedCPUs --value user-$((20000 + i)).slice)" "$i"
  done
  expect "TasksMax" "$(systemctl show -p TasksMax --value user-$UID0.slice)" 64
  expect "MemoryMax" "$(systemctl show -p MemoryMax --value user-$UID0.slice)" 268435456
  expect_match "nft table loaded" "$(nft list table inet kloigos 2>&1)" '20003 \. 2300-2399'
  expect "units FREE" "$(kloigos units --status FREE --json | grep -c '"compute_id"')" 4
  [[ -n "$out" ]] || true
  finish b-init-server

  # ---- c. allocation and ssh with the owner's key only
  start
  a=$(kloigos --json allocate --cpu-count 1 --ssh-key $KEYS/k1.pub --tag owner=alice --tag deployment_id=e2e)
  expect_match "allocated unit 0" "$a" "\"compute_id\": \"${HOST}_0\""
  expect_match "started_at set" "$a" '"started_at": "20'
  expect "ssh with the owner's key" "$(as_user $U0 k1 'id -un' 2>&1)" "$U0"
  as_user $U0 other true 2>/dev/null
  expect "ssh with another key refused" "$?" 255
  b=$(kloigos --json allocate --cpu-count 1 --ssh-key $KEYS/k2.pub --tag owner=bob)
  expect_match "allocated unit 1" "$b" "\"compute_id\": \"${HOST}_1\""
  as_user $U1 k1 true 2>/dev/null
  expect "alice's key does not open bob's unit" "$?" 255
  expect "linger on" "$(loginctl show-user $U0 -p Linger --value)" yes
  # Peer credentials on the unix socket: group kloigos is admin, anyone else only reads.
  id opsadmin >/dev/null 2>&1 || useradd -m -G kloigos opsadmin
  id plainuser >/dev/null 2>&1 || useradd -m plainuser
  expect_match "group kloigos member is admin" "$(runuser -u opsadmin -- kloigos --json units --status ALLOCATED 2>&1 | grep -c compute_id)" '^2$'
  out=$(runuser -u plainuser -- kloigos allocate --cpu-count 1 --ssh-key "$(cat $KEYS/k3.pub)" 2>&1)
  expect_match "other local user refused changes" "$out" 'needs role user.*HTTP 403'
  out=$(as_user $U1 k2 "kloigos deallocate ${HOST}_1" 2>&1)
  expect_match "a unit's own user refused changes" "$out" 'HTTP 403'
  expect_match "a unit's own user may read" "$(as_user $U1 k2 'kloigos --json units' 2>&1 | grep -c compute_id)" '^4$'
  finish c-allocate-ssh

  # ---- d. CPUs and limits: from an ssh session and from a systemd --user service
  start
  expect "ssh session CPUs" "$(as_user $U0 k1 'grep Cpus_allowed_list /proc/self/status' | awk '{print $2}')" 0
  expect_match "ssh session cgroup" "$(as_user $U0 k1 'cat /proc/self/cgroup')" "^0::/user.slice/user-$UID0.slice/session-[0-9]+.scope$"
  as_user $U0 k1 'systemd-run --user --unit=e2e-svc sleep 600' >/dev/null 2>&1
  pid=$(as_user $U0 k1 'systemctl --user show -p MainPID --value e2e-svc')
  expect "user service CPUs" "$(awk '/Cpus_allowed_list/ {print $2}' /proc/${pid:-0}/status 2>/dev/null)" 0
  expect_match "user service cgroup" "$(cat /proc/${pid:-0}/cgroup 2>/dev/null)" "user-$UID0.slice/user@$UID0.service"
  expect "unit 1 runs on CPU 1" "$(as_user $U1 k2 'grep Cpus_allowed_list /proc/self/status' | awk '{print $2}')" 1
  forked=$(as_user $U0 k1 'python3 -c "
import os, time
n = 0
try:
    for i in range(300):
        if os.fork() == 0:
            os.closerange(0, 3); time.sleep(120); os._exit(0)
        n += 1
except OSError:
    pass
print(n)"' 2>/dev/null)
  expect_match "fork bomb stops at TasksMax=64 (forked $forked)" "${forked:-x}" '^[0-9]+$'
  ((${forked:-999} < 64)) || fails+=("fork bomb forked ${forked:-?} processes, TasksMax is 64")
  pkill -KILL -u $U0 -f 'import os, time' 2>/dev/null
  wait_for 10 bash -c "! pgrep -u $U0 -f 'import os, time'"
  expect "pids.max" "$(cat /sys/fs/cgroup/user.slice/user-$UID0.slice/pids.max)" 64
  finish d-cpus-and-limits

  # ---- e. ports: 2000-2099 for unit 0, 2100-2199 for unit 1
  start
  serve='import socket,sys
s=socket.socket(); s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1); s.bind(("0.0.0.0",int(sys.argv[1]))); s.listen(8); s.settimeout(60)
while True:
    c,_=s.accept(); c.sendall(b"hello"); c.close()'
  probe='import socket,sys
try:
    s=socket.create_connection(("127.0.0.1",int(sys.argv[1])),timeout=2); s.settimeout(2); print("open" if s.recv(5)==b"hello" else "silent")
except Exception: print("closed")'
  mkdir -p $E2E
  printf '%s\n' "$serve" >$E2E/serve.py; printf '%s\n' "$probe" >$E2E/probe.py; chmod 644 $E2E/serve.py $E2E/probe.py
  for p in 2050 2150 9050; do as_user $U0 k1 "nohup python3 $E2E/serve.py $p </dev/null >/dev/null 2>&1 &"; done
  python3 $E2E/serve.py 7050 >/dev/null 2>&1 &
  root_srv=$!
  sleep 1
  expect "own port from the host" "$(python3 $E2E/probe.py 2050)" open
  expect "own port from the other unit's user" "$(as_user $U1 k2 "python3 $E2E/probe.py 2050")" open
  expect "the other unit's port" "$(python3 $E2E/probe.py 2150)" closed
  expect "a port outside every range" "$(python3 $E2E/probe.py 9050)" closed
  expect "outgoing connection of the unit's user" "$(as_user $U0 k1 "python3 $E2E/probe.py 7050")" open
  kill $root_srv 2>/dev/null
  expect_match "fence counter moved" "$(nft list chain inet kloigos output)" 'counter packets [1-9]'
  finish e-ports

  # ---- e2. an admin restarts nftables on a freshly installed host, before any reboot
  start
  systemctl restart nftables.service
  # PartOf= queues kloigos-nftables' restart behind nftables'; it loads the table a moment later.
  wait_for 30 bash -c '[[ $(systemctl is-active kloigos-nftables.service) == active ]] && nft list table inet kloigos'
  expect "kloigos-nftables.service active" "$(systemctl is-active kloigos-nftables.service)" active
  expect_match "table back after nftables restart" "$(nft list table inet kloigos 2>&1)" 'meta skuid . th sport'
  for p in 2051 9051; do as_user $U0 k1 "nohup python3 $E2E/serve.py $p </dev/null >/dev/null 2>&1 &"; done
  sleep 1
  expect "foreign port still fenced" "$(python3 $E2E/probe.py 9051)" closed
  expect "other unit's port still fenced" "$(python3 $E2E/probe.py 2150)" closed
  expect "own port still open" "$(python3 $E2E/probe.py 2051)" open
  finish e2-fence-after-nftables-restart

  # ---- f. files
  start
  for d in /opt/c0 /mnt/c0 /home/u0; do
    expect "$d owner and mode" "$(stat -c '%U:%G %a' $d)" "$U0:$U0 750"
  done
  as_user $U0 k1 'echo secret > /opt/c0/secret; echo data > /mnt/c0/data; echo x > ~/notes'
  as_user $U1 k2 'cat /opt/c0/secret' >/dev/null 2>&1; expect "other unit cannot read /opt/c0" "$?" 1
  as_user $U1 k2 'ls /home/u0' >/dev/null 2>&1; expect "other unit cannot list /home/u0" "$?" 2
  as_user $U1 k2 'touch /mnt/c0/intruder' >/dev/null 2>&1; expect "other unit cannot write /mnt/c0" "$?" 1
  expect "no intruder file" "$(ls /mnt/c0)" data
  finish f-files

  # ---- g. deallocation: nothing of the owner survives
  start
  as_user $U0 k1 'nohup sleep 1000 </dev/null >/dev/null 2>&1 &
    nohup python3 -c "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(1000)" </dev/null >/dev/null 2>&1 &
    systemd-run --user --unit=e2e-longrun sleep 1000 >/dev/null
    echo "* * * * * touch /tmp/cron-ran" | crontab -
    echo "touch /tmp/at-ran" | at now + 2 hours 2>/dev/null
    echo junk > /tmp/u0-tmpfile; mkdir -p ~/.config/app; echo x > ~/.config/app/state' >/dev/null 2>&1
  expect_match "owner has processes before" "$(pgrep -u $U0 -c)" '^[1-9]'
  expect_match "owner has an at job before" "$(find /var/spool/cron/atjobs -user $U0 -type f | wc -l)" '^[1-9]'
  out=$(kloigos deallocate "${HOST}_0" 2>&1)
  expect "deallocate" "$?" 0
  expect "no process of the user left" "$(pgrep -u $U0 -c)" 0
  as_user $U0 k1 true 2>/dev/null; expect "key no longer works" "$?" 255
  expect "crontab gone" "$(crontab -l -u $U0 2>&1 | grep -c 'touch')" 0
  expect "at job gone" "$(find /var/spool/cron/atjobs -user $U0 -type f | wc -l)" 0
  expect "tmp file gone" "$(ls /tmp/u0-tmpfile 2>/dev/null)" ""
  expect "/opt/c0 empty" "$(ls -A /opt/c0)" ""
  expect "/mnt/c0 empty" "$(ls -A /mnt/c0)" ""
  expect "home back to the skeleton" "$(ls -A /home/u0 | sort | tr '\n' ' ')" "$(ls -A /etc/skel | cat - <(echo .ssh) | sort | tr '\n' ' ')"
  expect "linger off" "$(ls /var/lib/systemd/linger/$U0 2>/dev/null)" ""
  expect_match "journal entries with COMPUTE_ID= and OPERATION=" "$(journalctl -q -o cat COMPUTE_ID=${HOST}_0 OPERATION=deallocate | wc -l)" '^[1-9]'
  expect "unit FREE" "$(kloigos --json unit ${HOST}_0 | grep -o '"status": "[A-Z_]*"')" '"status": "FREE"'
  c=$(kloigos --json allocate --cpu-count 1 --ssh-key $KEYS/k3.pub --tag owner=carol)
  expect_match "reallocated the same unit" "$c" "\"compute_id\": \"${HOST}_0\""
  expect "new owner logs in" "$(as_user $U0 k3 'id -un' 2>&1)" "$U0"
  expect "new owner starts clean" "$(as_user $U0 k3 'ls -A ~/.config /opt/c0 /mnt/c0 2>/dev/null | grep -v : | grep -c .')" 0
  expect "no user service from before" "$(as_user $U0 k3 'systemctl --user list-units --all --no-legend e2e-longrun.service e2e-svc.service | wc -l')" 0
  finish g-deallocate
  ;;

generator)
  # ---- l. the generator writes each unit's drop-ins under /run/systemd/generator from the
  # state file; nothing of Kloigos is left in /etc/systemd/system.
  start
  expect "generator installed" "$(stat -c '%a %U' $GEN 2>&1)" "755 root"
  expect "state file" "$(stat -c '%a %U:%G' $STATE 2>&1)" "644 root:root"
  got=$(python3 - "$STATE" <<'PY' 2>&1
import json, sys
with open(sys.argv[1]) as f:
    state = json.load(f)
ids = set()
def walk(o):
    if isinstance(o, dict):
        if isinstance(o.get("compute_id"), str):
            ids.add(o["compute_id"])
        for v in o.values():
            walk(v)
    elif isinstance(o, list):
        for v in o:
            walk(v)
walk(state)
print(state.get("version"), *sorted(ids))
PY
)
  expect "state file: version 1, the 4 units" "$got" "1 ${HOST}_0 ${HOST}_1 ${HOST}_2 ${HOST}_3"
  expect "state file: pretty (one field a line)" "$(awk 'END { print (NR > 10) ? "yes" : "no (" NR " lines)" }' $STATE)" yes
  expect "state file: no SSH key" "$(grep -c 'ssh-ed25519' $STATE)" 0
  for uid in $UIDS; do
    expect "systemctl cat user-$uid.slice" "$(systemctl cat user-$uid.slice 2>&1 | grep '^# /.*/50-kloigos\.conf$')" "# $GENDIR/user-$uid.slice.d/50-kloigos.conf"
    expect "systemctl cat user@$uid.service" "$(systemctl cat user@$uid.service 2>&1 | grep '^# /.*/50-kloigos\.conf$')" "# $GENDIR/user@$uid.service.d/50-kloigos.conf"
    expect "AllowedCPUs of user-$uid.slice" "$(systemctl show -p AllowedCPUs --value user-$uid.slice)" "$((uid - 20000))"
  done
  expect "user@$UID1.service delegates cpuset" "$(systemctl show -p DelegateControllers --value user@$UID1.service | grep -o cpuset)" cpuset
  expect "nothing of Kloigos in /etc/systemd/system" \
    "$(find /etc/systemd/system -name 'user-*.slice.d' -o -name 'user@*.service.d' -o -name '50-kloigos.conf'; grep -rl Kloigos /etc/systemd/system)" ""
  # Run by hand, it writes the same files, those only, and nothing without a state file.
  g=$(mktemp -d)
  mkdir -p $g/normal $g/early $g/late $g/n2 $g/e2 $g/l2 $g/emptyroot
  $GEN $g/normal $g/early $g/late 2>$g/stderr
  expect "generator by hand: exit status" "$?" 0
  want=$(for uid in $UIDS; do echo "./normal/user-$uid.slice.d/50-kloigos.conf"; echo "./normal/user@$uid.service.d/50-kloigos.conf"; done | sort | paste -sd' ')
  expect "generator by hand: only the units' drop-ins" "$(cd $g && find . -type f ! -name stderr | sort | paste -sd' ')" "$want"
  expect "generator by hand: what systemd loaded" \
    "$(cd $g/normal && for f in */50-kloigos.conf; do cmp -s "$f" "$GENDIR/$f" || echo "$f differs"; done)" ""
  KLOIGOS_GENERATOR_ROOT=$g/emptyroot $GEN $g/n2 $g/e2 $g/l2 2>/dev/null
  expect "no state file: exit status" "$?" 0
  expect "no state file: no output" "$(find $g/n2 $g/e2 $g/l2 -mindepth 1)" ""
  rm -rf "$g"
  # Without the generator a reload loads no limit at all: reconcile fails, naming it, and
  # succeeds again once it is back.
  mv $GEN /root/kloigos-generator.away
  rm -f $GENDIR/user-$UID1.slice.d/50-kloigos.conf
  out=$(kloigos reconcile 2>&1); rc=$?
  expect "reconcile without the generator fails" "$([[ $rc != 0 ]] && echo failed)" failed
  expect_match "... and names it" "$out" 'is kloigos-generator installed'
  mv /root/kloigos-generator.away $GEN
  out=$(kloigos reconcile 2>&1)
  expect "reconcile with the generator back" "$?" 0
  expect "limits back" "$(systemctl show -p AllowedCPUs --value user-$UID1.slice)" 1
  finish l-generator-dropins

  # ---- m. an admin's own drop-in in /etc/systemd/system wins over the generator's, and
  # reconcile leaves it alone.
  start
  A=/etc/systemd/system/user-$UID1.slice.d
  mkdir -p $A
  # AllowedCPUs= adds up over drop-ins: an admin's override first empties it.
  printf '# An admin moves this unit to CPUs 2-3.\n[Slice]\nAllowedCPUs=\nAllowedCPUs=2-3\n' >$A/60-admin.conf
  systemctl daemon-reload
  expect "admin's AllowedCPUs" "$(systemctl show -p AllowedCPUs --value user-$UID1.slice)" 2-3
  expect "in the cgroup" "$(cat /sys/fs/cgroup/user.slice/user-$UID1.slice/cpuset.cpus 2>&1)" 2-3
  expect "a login of the unit's user" "$(as_user $U1 k2 'grep Cpus_allowed_list /proc/self/status' | awk '{print $2}')" 2-3
  expect "both drop-ins loaded" "$(dropins user-$UID1.slice | grep -e kloigos -e admin | paste -sd' ')" \
    "$GENDIR/user-$UID1.slice.d/50-kloigos.conf $A/60-admin.conf"
  systemctl restart kloigos.service   # its start-up reconcile
  expect "service reconciled" "$(systemctl is-active kloigos.service)" active
  expect "admin's drop-in kept by reconcile" "$(grep -x AllowedCPUs=2-3 $A/60-admin.conf 2>&1)" AllowedCPUs=2-3
  expect "still the admin's CPUs after reconcile" "$(systemctl show -p AllowedCPUs --value user-$UID1.slice)" 2-3
  rm $A/60-admin.conf; rmdir $A
  systemctl daemon-reload
  expect "ours again without it" "$(systemctl show -p AllowedCPUs --value user-$UID1.slice)" 1
  expect "in the cgroup again" "$(cat /sys/fs/cgroup/user.slice/user-$UID1.slice/cpuset.cpus 2>&1)" 1
  expect "a login again" "$(as_user $U1 k2 'grep Cpus_allowed_list /proc/self/status' | awk '{print $2}')" 1
  finish m-admin-dropin-wins

  # ---- n1. a lingering unit user enables a `systemd --user` service that records, when it
  # starts, its CPUs and its cgroup's cpuset: after the reboot it tells what held at boot.
  start
  install -d -m 755 $E2E
  cat >$E2E/boot-probe.sh <<'SH'
#!/bin/sh
# Started by the unit user's systemd --user: the CPUs this process got, and its cgroup's cpuset.
cg=$(sed -n 's/^0:://p' /proc/self/cgroup)
d=/sys/fs/cgroup$cg
while [ ! -e "$d/cpuset.cpus.effective" ] && [ "$d" != /sys/fs/cgroup ]; do d=${d%/*}; done
out=$HOME/e2e-boot.txt
{
  echo "boot_id $(cat /proc/sys/kernel/random/boot_id)"
  echo "uptime $(cut -d' ' -f1 /proc/uptime)"
  echo "cpus $(sed -n 's/^Cpus_allowed_list:[[:space:]]*//p' /proc/self/status)"
  echo "cgroup $cg"
  echo "cpuset_of ${d#/sys/fs/cgroup}"
  echo "cpuset $(cat "$d/cpuset.cpus.effective")"
} >"$out.tmp" && mv "$out.tmp" "$out"
SH
  cat >$E2E/e2e-boot.service <<'UNIT'
[Unit]
Description=Kloigos e2e: the CPUs of a user service started at boot

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh /usr/local/share/kloigos-e2e/boot-probe.sh

[Install]
WantedBy=default.target
UNIT
  chmod 644 $E2E/boot-probe.sh $E2E/e2e-boot.service
  as_user $U1 k2 "mkdir -p ~/.config/systemd/user && cp $E2E/e2e-boot.service ~/.config/systemd/user/ &&
    systemctl --user daemon-reload && systemctl --user enable --now e2e-boot.service" >/dev/null 2>&1
  expect "probe enabled" "$(as_user $U1 k2 'systemctl --user is-enabled e2e-boot.service' 2>&1)" enabled
  f=/home/$U1/e2e-boot.txt
  expect "probe ran" "$(sed -n 's/^boot_id //p' $f 2>&1)" "$(cat /proc/sys/kernel/random/boot_id)"
  expect "probe's CPUs" "$(sed -n 's/^cpus //p' $f 2>&1)" 1
  expect "probe's cpuset" "$(sed -n 's/^cpuset //p' $f 2>&1)" 1
  finish n1-boot-probe-enabled
  ;;

upgrade)
  # ---- j. upgrade from a version without a generator: the real one (the commit before the
  # generator, built by e2e.sh), its service idle, its drop-ins in /etc/systemd/system, no state
  # file, no generator. The +up package must reconcile once (state file back, /etc drop-ins
  # gone, drop-ins under /run/systemd/generator) while every unit keeps its limits throughout.
  start
  before=$(kloigos --json units --status ALLOCATED | grep -c '"compute_id"')
  declare -A lim
  for uid in $UIDS; do lim[$uid]=$(limits_of $uid); done
  active=()
  for uid in $UIDS; do [[ -d /sys/fs/cgroup/user.slice/user-$uid.slice ]] && active+=("$uid"); done
  expect "allocated units' slices active" "${active[*]}" "$UID0 $UID1"
  pregen=$(ls $PKGS/kloigos_*~pregen*_amd64.deb 2>/dev/null | head -1)
  if [[ -n $pregen ]]; then
    # The real last version without a generator (e2e.sh built it from its commit): back to it,
    # its reconcile writes its drop-ins to /etc/systemd/system; it never had a state file.
    # Its inventory schema ends at migration 2 and it refuses a newer database (a downgrade
    # past a migration is not supported), so the database is put back as that version left
    # it (migrations 5 and 4: indexes, the change counter; then migration 3's columns and
    # table); the upgrade below then runs migrations 3 to 5 on it, as on a real old host.
    systemctl stop kloigos.service
    python3 - /var/lib/kloigos/kloigos.db <<'PY'
import sqlite3, sys
c = sqlite3.connect(sys.argv[1])
c.executescript("""
DROP INDEX servers_status; DROP INDEX servers_fleet;
DROP TRIGGER units_inserted; DROP TRIGGER units_updated; DROP TRIGGER units_deleted;
DROP TRIGGER servers_inserted; DROP TRIGGER servers_updated; DROP TRIGGER servers_deleted;
DROP TABLE kloigos_generation;
DROP INDEX compute_units_host; DROP INDEX compute_units_unsettled;
ALTER TABLE compute_units DROP COLUMN claim;
ALTER TABLE servers DROP COLUMN inventory_only;
DROP TABLE hosts;
PRAGMA user_version = 2;
""")
c.commit()
PY
    expect "database back at schema 2" "$?" 0
    out=$(deps_apt install -y --allow-downgrades -o Dpkg::Options::=--force-confold "$pregen" 2>&1)
    expect "install the pre-generator version" "$?" 0
    expect_match "pre-generator version installed" "$(dpkg-query -W -f '${Version}' kloigos)" '~pregen'
    out=$(kloigos reconcile 2>&1)
    expect "its reconcile" "$?" 0
    systemctl stop kloigos.service   # from here on nothing may connect to the socket before the upgrade
    rm -f $STATE
    systemctl daemon-reload
    expect "old host: no generator" "$(ls $GEN 2>&1 >/dev/null | grep -c 'No such file')" 1
  else
    # No such package (a shallow clone): the host is brought into the state that version
    # leaves by hand: its drop-ins in /etc, no state file, no generator.
    systemctl stop kloigos.service   # from here on nothing may connect to the socket before the upgrade
    for f in $GENDIR/user-*.slice.d/50-kloigos.conf $GENDIR/user@*.service.d/50-kloigos.conf; do
      [[ -f $f ]] || continue
      install -D -m 644 "$f" "/etc/systemd/system/${f#"$GENDIR"/}"
    done
    rm -f $STATE $GEN
    systemctl daemon-reload
  fi
  expect "old host: 8 drop-ins in /etc/systemd/system" "$(find /etc/systemd/system -name 50-kloigos.conf | wc -l)" 8
  expect "old host: drop-ins start with the old header" "$(head -qn1 /etc/systemd/system/user*/50-kloigos.conf | grep -vc '^# Generated by Kloigos')" 0
  expect "old host: no generator output" "$(find $GENDIR -name 50-kloigos.conf | wc -l)" 0
  for uid in $UIDS; do
    expect "old host: user-$uid.slice keeps its limits" "$(limits_of $uid)" "${lim[$uid]}"
    expect "old host: user-$uid.slice from /etc" "$(dropins user-$uid.slice | grep kloigos)" "/etc/systemd/system/user-$uid.slice.d/50-kloigos.conf"
  done
  samples=/root/upgrade-samples stop=/root/upgrade-samples.stop
  rm -f $stop; sample_limits $samples $stop "${active[@]}" & sampler=$!
  sleep 0.5
  t_up=$(awk '{ printf "%d", $1 * 1000000 }' /proc/uptime)
  deb=$(ls $PKGS/kloigos_*+up*_amd64.deb | head -1)
  out=$(deps_apt install -y -o Dpkg::Options::=--force-confold "$deb" 2>&1)
  expect "apt upgrade" "$?" 0
  sleep 0.5; touch $stop; wait $sampler
  expect_match "new version installed" "$(dpkg-query -W -f '${Version}' kloigos)" '\+up'
  ran=$(systemctl show -p InactiveExitTimestampMonotonic --value kloigos.service)
  expect "the idle service ran at the upgrade" "$(awk -v r="${ran:-0}" -v t="$t_up" 'BEGIN { print (r > t) ? "yes" : "no" }')" yes
  expect "old drop-ins gone from /etc/systemd/system" "$(find /etc/systemd/system -name 50-kloigos.conf -o -name 'user-*.slice.d' -o -name 'user@*.service.d')" ""
  expect "state file back" "$(stat -c '%a %U:%G' $STATE 2>&1)" "644 root:root"
  expect "generator installed" "$(stat -c '%a %U' $GEN 2>&1)" "755 root"
  for uid in $UIDS; do
    expect "user-$uid.slice keeps its limits" "$(limits_of $uid)" "${lim[$uid]}"
    expect "user-$uid.slice: the generator's drop-in" "$(dropins user-$uid.slice | grep kloigos)" "$GENDIR/user-$uid.slice.d/50-kloigos.conf"
    expect "user@$uid.service: the generator's drop-in" "$(dropins user@$uid.service | grep kloigos)" "$GENDIR/user@$uid.service.d/50-kloigos.conf"
  done
  # Throughout: one value per active slice in every sample, the one it had before.
  expect_match "limits sampled during the upgrade" "$(wc -l <$samples)" '^[0-9]{2,}$'
  echo "j-upgrade: $(wc -l <$samples) samples of the active slices' cgroup limits during the upgrade"
  for uid in "${active[@]}"; do
    seen=$(grep "^$uid " $samples | sort | uniq -c | awk '{ $1 = $1 " x"; print }' | paste -sd,)
    want=$(grep -c "^$uid " $samples)
    expect "user-$uid.slice cgroup limits during the upgrade" "$seen" "$want x $uid cpus=$((uid - 20000)) pids=64 mem=268435456"
  done
  expect "socket active" "$(systemctl is-active kloigos.socket)" active
  expect_match "service not failed" "$(systemctl is-failed kloigos.service)" '^(active|inactive)$'
  expect "allocations kept" "$(kloigos --json units --status ALLOCATED | grep -c '"compute_id"')" "$before"
  expect_match "new binary serves" "$(curl_api http://127.0.0.1:8000/healthz)" '"status":"ok"'
  expect "idle setting kept" "$(grep ^KLOIGOS_IDLE_TIMEOUT /etc/default/kloigos)" KLOIGOS_IDLE_TIMEOUT=5
  expect "owner still logs in" "$(as_user $U1 k2 'id -un' 2>&1)" "$U1"
  expect "and on the unit's CPU" "$(as_user $U1 k2 'grep Cpus_allowed_list /proc/self/status' | awk '{print $2}')" 1
  [[ ${#fails[@]} == 0 ]] || echo "$out" | tail -20
  finish j-upgrade
  ;;

reboot)
  # ---- n. AllowedCPUs held from the first second of this boot, before kloigos.service ever
  # ran: the user service n1 enabled recorded its CPUs when the lingering user manager started
  # it. First in this phase: nothing here may connect to kloigos.socket before.
  start
  f=/home/$U1/e2e-boot.txt
  probe() { sed -n "s/^$1 //p" $f 2>/dev/null; }
  expect "probe ran in this boot" "$(probe boot_id)" "$(cat /proc/sys/kernel/random/boot_id)"
  expect "user service's CPUs at boot" "$(probe cpus)" 1
  expect "its cgroup's cpuset.cpus.effective at boot" "$(probe cpuset)" 1
  expect_match "its cgroup" "$(probe cgroup)" "^/user.slice/user-$UID1.slice/user@$UID1.service/.*e2e-boot.service$"
  expect_match "cpuset read from its own cgroup or its slice" "$(probe cpuset_of)" "^/user.slice/user-$UID1.slice(/|$)"
  ran=$(systemctl show -p InactiveExitTimestampMonotonic --value kloigos.service)
  at=$(awk -v u="$(probe uptime)" 'BEGIN { printf "%d", u * 1000000 }')
  expect_match "probe's start time" "$at" '^[1-9][0-9]*$'
  expect "kloigos.service had not run before it (0: not in this boot)" \
    "$(awk -v r="${ran:-0}" -v p="$at" 'BEGIN { print (r == 0 || r > p) ? "yes" : "no: service at " r " us, probe at " p " us" }')" yes
  expect "only the generator's drop-in for it" "$(dropins user-$UID1.slice | grep kloigos)" "$GENDIR/user-$UID1.slice.d/50-kloigos.conf"
  echo "n-boot: kloigos.service started at ${ran:-0} us after boot; the probe at $at us"
  finish n-boot-limits-before-service

  start
  expect "socket active after boot" "$(systemctl is-active kloigos.socket)" active
  expect "nft restore unit" "$(systemctl is-active kloigos-nftables.service)" active
  expect_match "nft table after boot" "$(nft list table inet kloigos 2>&1)" 'meta skuid . th sport'
  expect "slice after boot" "$(systemctl show -p AllowedCPUs --value user-$UID1.slice)" 1
  expect "allocations after boot" "$(kloigos --json units --status ALLOCATED | grep -c '"compute_id"')" 2
  expect "owner logs in after boot" "$(as_user $U1 k2 'id -un' 2>&1)" "$U1"
  expect "lingering user manager after boot" "$(systemctl is-active user@$UID1.service)" active
  systemctl restart nftables.service
  wait_for 30 bash -c '[[ $(systemctl is-active kloigos-nftables.service) == active ]] && nft list table inet kloigos'
  expect_match "table survives nftables restart" "$(nft list table inet kloigos 2>&1)" 'meta skuid . th sport'
  systemctl reload nftables.service 2>/dev/null || true
  sleep 1
  expect_match "table survives nftables reload" "$(nft list table inet kloigos 2>&1)" 'meta skuid . th sport'
  python3 $E2E/serve.py 7051 >/dev/null 2>&1 & srv=$!
  as_user $U1 k2 "nohup python3 $E2E/serve.py 2001 </dev/null >/dev/null 2>&1 &"; sleep 1
  expect "fence still enforced after restart" "$(python3 $E2E/probe.py 2001)" closed
  kill $srv 2>/dev/null
  finish h-reboot
  ;;

bench-setup)
  # For scripts/bench-vm.sh: keys, the package, and a server of 4 one-CPU units, without the
  # checks of the phases above.
  start
  mkdir -p "$KEYS"
  for k in k1 k2; do [[ -f $KEYS/$k ]] || ssh-keygen -q -t ed25519 -N '' -C "$k@test" -f "$KEYS/$k"; done
  deb=$(ls $PKGS/kloigos_*_amd64.deb | grep -v -e '+up' -e '~pregen' | head -1)
  out=$(deps_apt install -y "$deb" 2>&1) || out=$(deps_apt update 2>&1 && deps_apt install -y "$deb" 2>&1)
  expect "apt install" "$?" 0
  ip=$(ip -4 -o addr show scope global | awk '{print $4}' | cut -d/ -f1 | head -1)
  out=$(kloigos init-server --hostname "$HOST" --ip "${ip:-127.0.0.1}" --region test --zone vm 0 1 2 3 2>&1)
  expect "init-server" "$?" 0
  finish bench-setup
  ;;

latency)
  # allocate -> ALLOCATED on the real systemd, as the caller sees it (curl's own time, on the
  # unix socket: no process start counted), and the same for deallocate; then what the
  # pieces of an allocation cost on this machine (a process start, loginctl's round trip to
  # logind, an fsync'ed atomic write), to say where the time goes. Under TCG every figure is
  # many times what it is on hardware.
  start
  sock=/run/kloigos/kloigos.sock
  key=$(cat $KEYS/k2.pub)
  alloc=() dealloc=()
  # The service may have exited idle: started again here, so no call below counts a start.
  curl_api --unix-socket $sock -o /dev/null http://localhost/healthz
  since=$(date '+%Y-%m-%d %H:%M:%S')
  for _ in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
    out=$(curl_api --unix-socket $sock -w '\n%{http_code} %{time_total}' -X POST -H 'Content-Type: application/json' \
      -d "{\"cpu_count\": 1, \"ssh_public_key\": \"$key\", \"tags\": {\"e2e\": \"latency\"}}" http://localhost/api/compute_units/allocate)
    read -r code secs <<<"$(tail -1 <<<"$out")"
    [[ $code == 200 ]] || { fails+=("allocate: $out"); break; }
    id=$(head -1 <<<"$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["compute_id"])')
    alloc+=("$secs")
    out=$(curl_api --unix-socket $sock -w '\n%{http_code} %{time_total}' -X DELETE "http://localhost/api/compute_units/deallocate/$id")
    read -r code secs <<<"$(tail -1 <<<"$out")"
    [[ $code == 200 ]] || { fails+=("deallocate $id: $out"); break; }
    dealloc+=("$secs")
  done
  pcts() { printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 * 1000 } END { if (NR) printf "p50 %.0f ms, p99 %.0f ms (n=%d)", v[int((NR + 1) / 2)], v[NR - int(NR / 100)], NR }'; }
  u=kloigos-latprobe
  useradd -r -M -s /usr/sbin/nologin "$u" 2>/dev/null || true
  t=$EPOCHREALTIME; for _ in 1 2 3 4 5; do /bin/true; done; spawn=$(awk -v a="$t" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.0f", (b - a) * 200 }')
  t=$EPOCHREALTIME; for _ in 1 2 3 4 5; do loginctl enable-linger "$u"; loginctl disable-linger "$u"; done
  linger=$(awk -v a="$t" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.0f", (b - a) * 100 }')
  t=$EPOCHREALTIME; for i in 1 2 3 4 5; do python3 -c 'import os,sys; f=open(sys.argv[1]+".tmp","w"); f.write("x"); f.flush(); os.fsync(f.fileno()); f.close(); os.rename(sys.argv[1]+".tmp", sys.argv[1]); d=os.open("/var/tmp", os.O_RDONLY); os.fsync(d)' /var/tmp/e2e-fsync; done
  fsync=$(awk -v a="$t" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.0f", (b - a) * 200 }')
  rm -f /var/tmp/e2e-fsync
  userdel "$u" 2>/dev/null || true
  expect "no unit left allocated by this phase" "$(kloigos --json units 2>/dev/null | grep -c '"e2e": "latency"')" 0
  finish a-allocate-latency
  echo "RESULT a-latency-figures PASS $(secs) allocate $(pcts "${alloc[@]}"); deallocate $(pcts "${dealloc[@]}"); one process start ${spawn} ms, loginctl enable+disable-linger ${linger} ms, python3 start + fsync'ed atomic write ${fsync} ms"
  # For scripts/bench-vm.sh: figure|measured|goal.
  p5099() { printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 * 1000 } END { if (NR) printf "%.0f ms / %.0f ms", v[int((NR + 1) / 2)], v[NR - int(NR / 100)] }'; }
  echo "BENCH|VM: allocate → ALLOCATED ($((${#alloc[@]})) calls, curl on the unix socket), p50 / p99|$(p5099 "${alloc[@]}")|< 20 ms / < 100 ms"
  echo "BENCH|VM: deallocate ($((${#dealloc[@]})) calls), p50 / p99|$(p5099 "${dealloc[@]}")|"
  # Where an allocation's time went on the host, from the service's "allocation applied" lines.
  parts=$(journalctl -u kloigos.service --since "$since" -o json --no-pager 2>/dev/null | python3 -c '
import json, sys
rows = []
for line in sys.stdin:
    try:
        e = json.loads(line)
    except ValueError:
        continue
    if "KEY_US" in e:
        rows.append([int(e[k]) for k in ("KEY_US", "FILES_US", "LINGER_US")])
if rows:
    m = lambda i: sorted(r[i] for r in rows)[len(rows) // 2] / 1000
    print("key %.0f ms, files %.0f ms, linger %.0f ms (medians of %d)" % (m(0), m(1), m(2), len(rows)))
')
  echo "BENCH|VM: allocate, the host side: authorized_keys, files (tmpfiles.d, state), linger|${parts:-n/a}|"
  echo "BENCH|VM: one process start (/bin/true)|${spawn} ms|"
  echo "BENCH|VM: loginctl enable-linger + disable-linger|${linger} ms|"
  echo "BENCH|VM: python3 start + an fsync'ed atomic write|${fsync} ms|"
  ;;

race)
  # k. A hostile tenant (tests/race/tenant.py) swaps its ~/.ssh with a symlink to a root-owned
  # directory and plants symlinks for whatever root creates in its home, while root restarts
  # the service (start-up reconcile) and deallocates and reallocates the unit. The target must
  # not change.
  start
  T=/var/lib/e2e-race-target
  install -d -m 755 $T; echo secret >$T/secret; chmod 600 $T/secret; install -d -m 700 $T/sub
  state() { find $T -printf '%p %y %m %U:%G %s %l\n' | sort; find $T -type f -exec sha256sum {} + | sort; }
  before=$(state)
  install -m 644 /root/tenant.py $E2E/tenant.py
  C2=
  for round in 1 2; do
    a=$(kloigos --json allocate --cpu-count 1 --ssh-key $KEYS/k4.pub --tag owner=mallory)
    c=$(sed -n 's/.*"compute_id": "\([^"]*\)".*/\1/p' <<<"$a" | head -1)
    [[ -n $c ]] || { fails+=("round $round: allocate: $a"); break; }
    C2=${C2:-$c}; U2=$(kloigos --json unit "$c" | sed -n 's/.*"user": "\([^"]*\)".*/\1/p' | head -1)
    U2=${U2:-u${c##*_}}
    as_user $U2 k4 "nohup python3 $E2E/tenant.py --home /home/$U2 --target $T --seconds 90 </dev/null >/tmp/tenant.log 2>&1 &" 2>/dev/null
    wait_for 10 pgrep -u $U2 -f tenant.py || fails+=("round $round: the tenant script did not start")
    for i in 1 2; do
      systemctl restart kloigos.service || fails+=("round $round: restart $i failed")
    done
    out=$(kloigos deallocate "$C2" 2>&1) || fails+=("round $round: deallocate: $out")
  done
  after=$(state)
  expect "target unchanged (content, mode, owner)" "$after" "$before"
  expect "no tenant process left" "$(pgrep -u "${U2:-nobody}" -f tenant.py -c)" 0
  expect "service active" "$(systemctl is-active kloigos.service)" active
  expect "unit 2 FREE" "$(kloigos --json unit "$C2" | grep -o '"status": "[A-Z_]*"')" '"status": "FREE"'
  rm -rf $T
  finish k-tenant-race
  ;;

fleet-prepare)
  # ---- o. a host joins a hub only without a server of its own (join refuses, else the first
  # pull would tear it down): decommission it; and the hub's pokes, forwarded by qemu from the
  # CI machine's 127.0.0.1:VM_POKE_PORT to this guest's :8000, must land on kloigos.socket.
  start
  out=$(kloigos decommission --force "$HOST" 2>&1)
  expect "local decommission" "$?" 0
  expect "local users gone" "$(getent passwd u0 u1 u2 u3)" ""
  ip=$(ip -4 -o addr show scope global | awk '{print $4}' | cut -d/ -f1 | head -1)
  expect_match "guest address" "$ip" '^[0-9.]+$'
  printf '# e2e fleet phase: the hub pokes arrive here (qemu hostfwd to :8000)\n[Socket]\nListenStream=%s:8000\n' \
    "${ip:-10.0.2.15}" | install -D -m 644 /dev/stdin /etc/systemd/system/kloigos.socket.d/60-e2e-fleet.conf
  systemctl daemon-reload
  systemctl stop kloigos.service
  systemctl restart kloigos.socket
  expect "socket active" "$(systemctl is-active kloigos.socket)" active
  expect_match "socket listens on the guest's address" "$(systemctl show -p Listen --value kloigos.socket)" "${ip:-x}:8000"
  expect_match "a poke before joining: 404" "$(curl -s -X POST --max-time 30 "http://${ip:-x}:8000/api/host/poke")" 'has not joined'
  finish o-fleet-prepare
  ;;

fleet-join)
  # ---- p. kloigos join (the hub made the token; e2e.sh copied it to /root/host-token)
  start
  hub=${2:-} poke=${3:-}
  out=$(kloigos join --hub "$hub" --token-file /root/host-token --poke-url "$poke" 2>&1)
  rc=$?
  expect "kloigos join" "$rc" 0
  [[ $rc == 0 ]] || echo "$out" | tail -20
  expect "join.json" "$(python3 -c 'import json; d = json.load(open("/etc/kloigos/join.json")); print(d["hubs"], d["hostname"], d["poke_url"])' 2>&1)" \
    "['$hub'] $HOST $poke"
  expect "host-token mode" "$(stat -c '%a %U' /etc/kloigos/host-token 2>&1)" "600 root"
  expect "host-token content" "$(cat /etc/kloigos/host-token 2>&1)" "$(cat /root/host-token)"
  expect "pull timer enabled" "$(systemctl is-enabled kloigos-pull.timer 2>&1)" enabled
  expect "pull timer active" "$(systemctl is-active kloigos-pull.timer 2>&1)" active
  expect_match "a poke now schedules a pull" "$(curl -s -X POST --max-time 30 http://127.0.0.1:8000/api/host/poke)" 'pull scheduled'
  out=$(kloigos init-server --hostname "$HOST" --ip 127.0.0.1 --region test --zone vm 0 1 2>&1)
  expect_match "local writes refused: use a hub" "$out" 'use a hub.*HTTP 409'
  rm -f /root/host-token
  finish p-fleet-join
  ;;

fleet-server)
  # ---- q. what the hub's init_server made here (cpu_ranges 0-1 and 2-3, uid_base 20000)
  start
  expect "user u0-1" "$(getent passwd u0-1 | cut -d: -f3,6)" "20000:/home/u0-1"
  expect "user u2-3" "$(getent passwd u2-3 | cut -d: -f3,6)" "20002:/home/u2-3"
  expect "AllowedCPUs of user-20000.slice" "$(systemctl show -p AllowedCPUs --value user-20000.slice)" 0-1
  expect "AllowedCPUs of user-20002.slice" "$(systemctl show -p AllowedCPUs --value user-20002.slice)" 2-3
  expect "the generator's drop-in" "$(dropins user-20002.slice | grep kloigos)" "$GENDIR/user-20002.slice.d/50-kloigos.conf"
  expect_match "nft table" "$(nft list table inet kloigos 2>&1)" '20002 \. 2200-2399'
  expect_match "local mirror of the server" "$(kloigos --json units | grep -c '"compute_id"')" '^2$'
  for d in /opt/c0-1 /mnt/c0-1 /home/u0-1; do
    expect "$d owner and mode" "$(stat -c '%U:%G %a' $d 2>&1)" "u0-1:u0-1 750"
  done
  finish q-fleet-server
  ;;

fleet-released)
  # the unit of user $2 released: the checks of g-deallocate
  start
  u=${2:-none}; c=${u#u}
  expect "no process of $u" "$(pgrep -u "$u" -c)" 0
  expect "no authorized key" "$(cat /home/$u/.ssh/authorized_keys 2>/dev/null)" ""
  expect "linger off" "$(ls /var/lib/systemd/linger/$u 2>/dev/null)" ""
  expect "/opt/c$c empty" "$(ls -A /opt/c$c 2>&1)" ""
  expect "/mnt/c$c empty" "$(ls -A /mnt/c$c 2>&1)" ""
  expect "home back to the skeleton" "$(ls -A /home/$u | sort | tr '\n' ' ')" "$(ls -A /etc/skel | cat - <(echo .ssh) | sort | tr '\n' ' ')"
  finish "${3:-released-$u}"
  ;;

fleet-leave)
  # ---- v. the hub decommissioned this host's server: all of it is gone. Then the host leaves
  # the hub (`kloigos leave`: a last pull, the timer disabled, the join files gone, the service
  # restarted standalone) and gets the server of the units phase again, so that the purge phase
  # finds what it checks.
  start
  expect "users gone" "$(getent passwd u0-1 u2-3)" ""
  expect "slices' drop-ins gone" "$(ls $GENDIR/user-20000.slice.d $GENDIR/user-20002.slice.d 2>/dev/null)" ""
  expect "dirs gone" "$(ls -d /opt/c0-1 /opt/c2-3 /home/u0-1 /home/u2-3 2>/dev/null)" ""
  expect "no process of the users" "$(pgrep -u 20000,20002 -c)" 0
  expect "nft table empty of them" "$(nft list table inet kloigos 2>/dev/null | grep -c 2000)" 0
  out=$(kloigos leave 2>&1)
  expect "kloigos leave" "$?" 0
  expect_match "leave names the hub's next step" "$out" 'kloigos host remove '
  expect "pull timer disabled" "$(systemctl is-enabled kloigos-pull.timer 2>&1)" disabled
  expect "pull timer stopped" "$(systemctl is-active kloigos-pull.timer 2>&1)" inactive
  expect "join files gone" "$(ls /etc/kloigos/join.json /etc/kloigos/host-token 2>/dev/null)" ""
  out=$(kloigos leave 2>&1)
  expect "leave again: not joined" "$?" 1
  # The admin's firewall of the before phase: the catch-up boot (f8) did not start it (the image
  # does not enable nftables.service; the reboot phase restarts it by hand); purge compares.
  systemctl start nftables.service
  rm -r /etc/systemd/system/kloigos.socket.d
  systemctl daemon-reload
  systemctl stop kloigos.service
  systemctl restart kloigos.socket
  out=$(kloigos init-server --hostname "$HOST" --ip 127.0.0.1 --region test --zone vm \
        --limits '{"tasks_max": 64, "memory_max_per_cpu": 268435456}' 0 1 2 3 2>&1)
  expect "local init-server again" "$?" 0
  [[ ${#fails[@]} == 0 ]] || echo "$out" | tail -5
  a=$(kloigos --json allocate --cpu-count 1 --ssh-key $KEYS/k3.pub --tag owner=carol)
  expect_match "u0 for carol" "$a" "\"compute_id\": \"${HOST}_0\""
  b=$(kloigos --json allocate --cpu-count 1 --ssh-key $KEYS/k2.pub --tag owner=bob)
  expect_match "u1 for bob" "$b" "\"compute_id\": \"${HOST}_1\""
  expect "bob logs in on CPU 1" "$(as_user $U1 k2 'grep Cpus_allowed_list /proc/self/status' | awk '{print $2}')" 1
  finish v-fleet-leave
  ;;

purge)
  # ---- i0. apt remove while units still exist: the generator leaves with the package, so the
  # units' drop-ins are no longer loaded (decided, see packaging/debian/prerm; the package
  # warns); the state stays and a reinstall brings every unit's limits back.
  start
  declare -A lim
  for uid in $UIDS; do lim[$uid]=$(limits_of $uid); done
  expect "before: the generator's drop-ins loaded" "$(loaded_kloigos_dropins | wc -l)" 8
  out=$(deps_apt remove -y kloigos 2>&1)
  expect "apt remove" "$?" 0
  expect_match "remove warns about the units" "$out" 'kloigos: [1-9][0-9]* compute unit\(s\) still exist'
  expect "generator removed" "$(ls $GEN 2>/dev/null)" ""
  expect "state kept" "$(ls $STATE 2>&1)" $STATE
  expect "no Kloigos drop-in loaded after remove" "$(loaded_kloigos_dropins)" ""
  expect "AllowedCPUs lifted" "$(systemctl show -p AllowedCPUs --value user-$UID1.slice)" ""
  deb=$(ls $PKGS/kloigos_*+up*_amd64.deb | head -1)
  deps_apt install -y -o Dpkg::Options::=--force-confold "$deb" >/dev/null 2>&1
  expect "reinstall" "$?" 0
  expect "reinstall: the generator's drop-ins" "$(loaded_kloigos_dropins | wc -l)" 8
  for uid in $UIDS; do expect "reinstall: user-$uid.slice limits back" "$(limits_of $uid)" "${lim[$uid]}"; done
  expect "reinstall: socket active" "$(systemctl is-active kloigos.socket)" active
  expect "reinstall: a login on the unit's CPU" "$(as_user $U1 k2 'grep Cpus_allowed_list /proc/self/status' | awk '{print $2}')" 1
  finish i0-remove-reinstall

  # ---- i. decommission, remove, purge: the host as before Kloigos, no Kloigos drop-in loaded
  start
  out=$(kloigos decommission --force "$HOST" 2>&1)
  expect "decommission --force" "$?" 0
  deps_apt remove -y kloigos >/dev/null 2>&1
  expect "apt remove" "$?" 0
  expect "remove stops the socket" "$(systemctl is-active kloigos.socket)" inactive
  expect "remove keeps the state" "$(ls /var/lib/kloigos/kloigos.db 2>&1)" /var/lib/kloigos/kloigos.db
  # A drop-in that a version without a generator wrote and never reconciled away goes with the
  # purge; an admin's file of the same name stays.
  install -D -m 644 /dev/stdin /etc/systemd/system/user-$UID0.slice.d/50-kloigos.conf <<<$'# Generated by Kloigos for compute unit old_0 (user u0).\n[Slice]\nAllowedCPUs=0'
  install -D -m 644 /dev/stdin /etc/systemd/system/user-$UID1.slice.d/50-kloigos.conf <<<$'# An admin\'s file\n[Slice]\nAllowedCPUs=1'
  deps_apt purge -y kloigos >/dev/null 2>&1
  expect "apt purge" "$?" 0
  expect "purge removed the old Kloigos drop-in and its directory" "$(ls -d /etc/systemd/system/user-$UID0.slice.d 2>/dev/null)" ""
  expect "purge kept the admin's file" "$(ls /etc/systemd/system/user-$UID1.slice.d 2>&1)" 50-kloigos.conf
  rm -r /etc/systemd/system/user-$UID1.slice.d
  systemctl daemon-reload
  expect "after purge and daemon-reload: no Kloigos drop-in loaded" "$(loaded_kloigos_dropins)" ""
  expect "systemctl cat shows none" "$(for uid in $UIDS; do systemctl cat user-$uid.slice user@$uid.service 2>/dev/null; done | grep -ci kloigos)" 0
  userdel -r opsadmin 2>/dev/null; userdel -r plainuser 2>/dev/null
  snapshot >"$SNAP.after"
  d=$(diff "$SNAP.before" "$SNAP.after")
  expect "host as before (diff of users, groups, unit files, generator, tmpfiles, dirs, linger, nft tables)" "$d" ""
  expect "no process of unit users" "$(pgrep -u 20000,20001,20002,20003 -c 2>/dev/null)" 0
  expect "no socket left" "$(systemctl is-active kloigos.socket)" inactive
  finish i-decommission-purge
  ;;

*) sed -n 2,26p "$0"; exit 2 ;;
esac
