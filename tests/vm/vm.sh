#!/usr/bin/env bash
# Kloigos end-to-end test bed: a throw-away Debian 12 VM with a real systemd as PID 1
# (cgroup v2 with cpuset, nftables, sshd, cron, at), run under qemu in software mode (TCG),
# because the CI machines are microVMs whose /dev/kvm (kvm-pvm) cannot boot a stock kernel.
#
#   vm.sh image                  build the base image (debootstrap; ~2-3 min, cached while the recipe is unchanged)
#   vm.sh up                     boot a fresh VM (qcow2 overlay over the base image) and wait for systemd
#   vm.sh ssh CMD...             run CMD in the guest as root; stdin is passed through; exit status is CMD's
#   vm.sh ssh-user USER KEY CMD...  the same, as USER authenticating with private key file KEY
#   vm.sh put SRC DEST           copy SRC (file or directory) from the host to DEST in the guest
#   vm.sh get SRC DEST           copy SRC (file or directory) from the guest to DEST on the host
#   vm.sh reboot                 reboot the guest and wait until it is back and systemd is up (disk kept)
#   vm.sh down                   power off (qemu is killed if it has not stopped after 30 s)
#   vm.sh status                 image and VM state; exit 0 only if the VM is up and answers ssh
#
# CMD: a single argument is a shell command line run by the remote login shell
# ('systemctl is-active foo || journalctl -u foo'); several arguments are one command whose
# arguments are passed exactly (quoted with bash's printf %q).
# Reboots: qemu runs with -no-reboot, so a reboot started inside the guest (e.g. `vm.sh ssh
# systemctl reboot`) stops qemu; `vm.sh reboot` does the guest reboot itself, or after such a
# self-reboot, starts qemu again on the same disk and waits for systemd.
#
# Environment:
#   KLOIGOS_VM_DIR   image and run directory            (/var/tmp/kloigos-vm)
#   VM_SSH_PORT      host port forwarded to guest ssh   (2222, on 127.0.0.1 only)
#   VM_POKE_PORT     host port forwarded to guest :8000 (2280, on 127.0.0.1 only; a fleet hub on
#                    this machine pokes the guest there, see tests/vm/fleet.sh)
#   VM_CPUS, VM_MEM  guest vCPUs and MiB of memory      (4, 2048)
#   VM_BOOT_TIMEOUT  seconds to wait for ssh + systemd  (180)
#   VM_KAPPEND       extra kernel command line          (empty)
#   KLOIGOS_VM_MIRROR  Debian mirror for debootstrap    (the one apt uses on this host)
#
# Layout of KLOIGOS_VM_DIR: base/ (disk.raw, vmlinuz, initrd, id_ed25519[.pub], known_hosts, stamp)
# is replaced as a whole by a rename, so an interrupted build never leaves a half image;
# run.qcow2, qemu.pid, console.log (serial console), qemu.log belong to the current/last VM.
# Must run as root for `image` (and for installing host packages). Timings go to stderr.
set -euo pipefail
export LC_ALL=C
PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin
# shellcheck source=../../scripts/lib/deps.sh
. "$(dirname "$0")/../../scripts/lib/deps.sh"

# ---- the recipe: changing PKGS rebuilds the image; bump RECIPE_VERSION for any other change to build_image.
# PKGS is a minimal Debian host plus an admin's firewall (nftables) and sshd, and nothing that the
# kloigos package must bring in itself (libpam-systemd: ssh logins in the user's slice), so the
# package's dependencies are what the e2e tests.
RECIPE_VERSION=2
SUITE=bookworm
IMAGE_SIZE=4G
PKGS=systemd,systemd-sysv,dbus,udev,kmod,nftables,openssh-server,openssh-client,sudo,iproute2,procps,psmisc,curl,python3,linux-image-amd64,ca-certificates,at,cron
HOSTNAME_VM=kloigos-vm

DIR=${KLOIGOS_VM_DIR:-/var/tmp/kloigos-vm}
BASE=$DIR/base
PORT=${VM_SSH_PORT:-2222}
POKE_PORT=${VM_POKE_PORT:-2280}
CPUS=${VM_CPUS:-4}
MEM=${VM_MEM:-2048}
BOOT_TIMEOUT=${VM_BOOT_TIMEOUT:-180}
OVERLAY=$DIR/run.qcow2 PIDFILE=$DIR/qemu.pid CONSOLE=$DIR/console.log

log() { echo "vm.sh: $*" >&2; }
die() { log "$*"; exit 1; }
now() { echo "$EPOCHREALTIME"; }
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }

SSH_COMMON=(-o BatchMode=yes -o IdentitiesOnly=yes -o IdentityAgent=none
  -o StrictHostKeyChecking=yes -o UserKnownHostsFile="$BASE/known_hosts" -o HostKeyAlias="$HOSTNAME_VM"
  -o ConnectTimeout=5 -o ServerAliveInterval=10 -o ServerAliveCountMax=6 -o LogLevel=ERROR)
SSH_ROOT=("${SSH_COMMON[@]}" -i "$BASE/id_ed25519")

# quote a command for the remote shell: one argument = a command line, several = exact argv
remote_cmd() { if (($# == 1)); then printf '%s' "$1"; else printf '%q ' "$@"; fi; }

# ---------------------------------------------------------------- host dependencies
ensure_host_deps() {
  mkdir -p "$DIR"
  deps_qemu >"$DIR/apt-host.log" 2>&1 && return 0
  tail -20 "$DIR/apt-host.log" >&2
  die "installing the host packages failed; see $DIR/apt-host.log"
}

# the Debian mirror apt uses on this host (deb822 .sources first, then one-line sources.list)
find_mirror() {
  if [[ -n ${KLOIGOS_VM_MIRROR:-} ]]; then echo "${KLOIGOS_VM_MIRROR%/}"; return; fi
  local f m=
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -f $f ]] || continue
    m=$(awk -v want="$SUITE" '
      function flush(   n, s, i, u) {
        if (types ~ /(^|[ \t])deb([ \t]|$)/ && tolower(enabled) != "no") {
          n = split(suites, s, /[ \t]+/)
          for (i = 1; i <= n; i++) if (s[i] == want) { split(uris, u, /[ \t]+/); if (u[1] ~ /^(https?|ftp|file):/) { print u[1]; done = 1 } }
        }
        types = uris = suites = enabled = ""
      }
      done { exit }
      /^[ \t]*$/ { flush(); next }
      /^#/ { next }
      { key = tolower($1); v = $0; sub(/^[^:]*:[ \t]*/, "", v); sub(/[ \t]+$/, "", v) }
      key == "types:" { types = v }
      key == "uris:" { uris = v }
      key == "suites:" { suites = v }
      key == "enabled:" { enabled = v }
      END { if (!done) flush() }' "$f" | head -1)
    [[ -n $m ]] && break
  done
  if [[ -z $m && -f /etc/apt/sources.list ]]; then
    m=$(awk -v want="$SUITE" '$1 == "deb" { i = 2; if ($i ~ /^\[/) { while (i < NF && $i !~ /\]$/) i++; i++ }
                                            if ($(i + 1) == want && $i ~ /^(https?|ftp|file):/) { print $i; exit } }' /etc/apt/sources.list)
  fi
  [[ -n $m ]] || die "no '$SUITE' Debian mirror found in /etc/apt/sources.list{,.d/*.sources}; set KLOIGOS_VM_MIRROR"
  echo "${m%/}"
}

recipe_hash() { printf '%s\n' "$RECIPE_VERSION" "$SUITE" "$IMAGE_SIZE" "$PKGS" "$HOSTNAME_VM" | sha256sum | cut -d' ' -f1; }

image_ok() {
  [[ -f $BASE/stamp && $(cat "$BASE/stamp") == "$(recipe_hash)" ]] || return 1
  local f; for f in disk.raw vmlinuz initrd id_ed25519 known_hosts; do [[ -s $BASE/$f ]] || return 1; done
}

# unmount whatever a killed debootstrap may have left mounted below $1, then delete it
remove_tree() {
  local d=$1 m
  [[ -e $d ]] || return 0
  d=$(realpath "$d")
  while read -r m; do umount -l "$m" 2>/dev/null || true
  done < <(awk -v d="$d/" 'index($2 "/", d) == 1 { print $2 }' /proc/mounts | sort -r)
  rm -rf --one-file-system "$d"
}

# ---------------------------------------------------------------- image
build_image() {
  ensure_host_deps
  if image_ok; then log "base image up to date ($BASE)"; return 0; fi
  ((EUID == 0)) || die "building the image needs root (debootstrap, chroot)"
  vm_running && die "a VM is running on the old image; run 'vm.sh down' first"
  mkdir -p "$DIR"
  local d; for d in "$DIR"/.build.* "$DIR"/.old.*; do remove_tree "$d"; done   # leftovers of killed runs
  local mirror; mirror=$(find_mirror)
  local T t tmp r; T=$(now); t=$T
  tmp=$(mktemp -d "$DIR/.build.XXXXXX"); r=$tmp/rootfs; chmod 755 "$tmp"
  trap 'remove_tree "'"$tmp"'"' EXIT
  trap 'exit 130' INT TERM

  # debootstrap honours http_proxy; pass on apt's proxy if the host has one
  local proxy=; eval "$(apt-config shell proxy Acquire::http::Proxy)"
  [[ -n $proxy && -z ${http_proxy:-} ]] && export http_proxy=$proxy
  log "debootstrap $SUITE from $mirror (log: $DIR/debootstrap.log)"
  mkdir -p "$DIR/debs"
  debootstrap --variant=minbase --components=main --include="$PKGS" --cache-dir="$DIR/debs" \
    "$SUITE" "$r" "$mirror" >"$DIR/debootstrap.log" 2>&1 \
    || { tail -30 "$DIR/debootstrap.log" >&2; die "debootstrap failed; see $DIR/debootstrap.log"; }
  log "debootstrap: $(since "$t") s"; t=$(now)

  echo "$HOSTNAME_VM" >"$r/etc/hostname"
  printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\t\tlocalhost ip6-localhost ip6-loopback\nff02::1\t\tip6-allnodes\nff02::2\t\tip6-allrouters\n' \
    "$HOSTNAME_VM" >"$r/etc/hosts"
  printf '# <fs>\t<mount>\t<type>\t<options>\t<dump>\t<pass>\n/dev/vda\t/\text4\trw,relatime,errors=remount-ro\t0\t0\n' >"$r/etc/fstab"
  echo 'nameserver 10.0.2.3' >"$r/etc/resolv.conf"                           # qemu user-net DNS
  echo "deb $mirror $SUITE main" >"$r/etc/apt/sources.list"
  mkdir -p "$r/etc/systemd/network"
  printf '[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n' >"$r/etc/systemd/network/80-dhcp.network"
  chroot "$r" systemctl enable -q systemd-networkd.service
  chroot "$r" passwd -qd root                                 # console login for debugging; ssh needs the key
  # root's ssh key (new with every image) and the guest's host keys, baked in and pinned on the host side
  ssh-keygen -q -t ed25519 -N '' -C "root@kloigos-vm-host" -f "$tmp/id_ed25519"
  install -d -m 700 "$r/root/.ssh"
  install -m 600 "$tmp/id_ed25519.pub" "$r/root/.ssh/authorized_keys"
  ssh-keygen -A -f "$r" >/dev/null                              # only creates keys that are missing
  local k; for k in "$r"/etc/ssh/ssh_host_*_key.pub; do
    echo "$HOSTNAME_VM $(cut -d' ' -f1,2 "$k")"; done >"$tmp/known_hosts"
  : >"$r/etc/machine-id"                                        # a fresh id on every boot
  rm -f "$r/var/lib/dbus/machine-id"; ln -s /etc/machine-id "$r/var/lib/dbus/machine-id"
  chroot "$r" apt-get clean
  local kern=("$r"/boot/vmlinuz-*) initrd=("$r"/boot/initrd.img-*)
  ((${#kern[@]} == 1 && ${#initrd[@]} == 1)) && [[ -f ${kern[0]} && -f ${initrd[0]} ]] \
    || die "expected one kernel and one initrd in $r/boot"
  install -m 644 "${kern[0]}" "$tmp/vmlinuz"; install -m 644 "${initrd[0]}" "$tmp/initrd"
  local kver=${kern[0]##*/vmlinuz-} size; size=$(du -sh "$r" | cut -f1)
  log "configure: $(since "$t") s"; t=$(now)

  truncate -s "$IMAGE_SIZE" "$tmp/disk.raw"   # (an existing file keeps mke2fs quiet)
  mkfs.ext4 -q -F -L kloigos-root -d "$r" "$tmp/disk.raw"
  log "mkfs.ext4 -d: $(since "$t") s (rootfs $size, kernel $kver)"
  remove_tree "$r"
  printf 'built %s\nmirror %s\nkernel %s\npackages %s\n' "$(date -Is)" "$mirror" "$kver" "$PKGS" >"$tmp/info"
  recipe_hash >"$tmp/stamp"

  # swap into place: base/ is either the old complete image or the new complete one
  if [[ -e $BASE ]]; then mv -T "$BASE" "$DIR/.old.$$"; fi
  mv -T "$tmp" "$BASE"
  trap - EXIT INT TERM
  remove_tree "$DIR/.old.$$"
  rm -f "$OVERLAY"
  log "image build: $(since "$T") s total ($BASE)"
}

# ---------------------------------------------------------------- VM lifecycle
vm_pid() {
  local pid; pid=$(cat "$PIDFILE" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$OVERLAY" || return 1   # not a recycled pid
  echo "$pid"
}
vm_running() { vm_pid >/dev/null; }

ssh_root_n() { ssh "${SSH_ROOT[@]}" -p "$PORT" -n root@127.0.0.1 "$@"; }   # no stdin: for probes

# wait until ssh answers and systemd has finished booting; $1 = boot id that must NOT be seen (reboot)
wait_up() {
  local old_boot=${1:-} deadline=$((SECONDS + BOOT_TIMEOUT)) out boot state left
  while :; do
    left=$((deadline - SECONDS))
    ((left > 0)) || { log "guest not up after ${BOOT_TIMEOUT} s"; return 1; }
    vm_running || { log "qemu exited"; return 1; }
    out=$(timeout "$left" ssh "${SSH_ROOT[@]}" -p "$PORT" -n root@127.0.0.1 \
      'cat /proc/sys/kernel/random/boot_id; systemctl is-system-running --wait' 2>/dev/null) || true
    boot=$(sed -n 1p <<<"$out"); state=$(sed -n 2p <<<"$out")
    if [[ -n $boot && $boot != "$old_boot" ]]; then
      case $state in
        running) return 0 ;;
        degraded) log "systemd is degraded; failed units:"
          ssh_root_n 'systemctl --failed --no-legend --plain' >&2 || true; return 0 ;;
      esac
    fi
    sleep 1
  done
}

console_tail() { log "last lines of $CONSOLE:"; tail -n "${1:-40}" "$CONSOLE" >&2 2>/dev/null || true; }

kill_vm() {
  local pid; pid=$(vm_pid) || { rm -f "$PIDFILE"; return 0; }
  kill "$pid" 2>/dev/null || true
  local i; for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
  rm -f "$PIDFILE"
}

# start qemu on the existing overlay. -no-reboot: a guest reboot makes qemu exit and `vm.sh reboot`
# starts a new qemu on the same disk, because a warm reset under TCG was measured to boot ~3x slower
# (reboot 60-90 s against 21-27 s for a cold start) on this machine kind.
start_qemu() {
  port_free || die "127.0.0.1:$PORT is already in use; set VM_SSH_PORT"
  port_free "$POKE_PORT" || die "127.0.0.1:$POKE_PORT is already in use; set VM_POKE_PORT"
  rm -f "$PIDFILE"
  # 9>&-: the daemon must not inherit our lock
  qemu-system-x86_64 -name kloigos-vm -nodefaults -no-user-config -no-reboot \
    -accel tcg,thread=multi -cpu max -smp "$CPUS" -m "$MEM" \
    -kernel "$BASE/vmlinuz" -initrd "$BASE/initrd" \
    -append "root=/dev/vda rw console=ttyS0 panic=-1 ${VM_KAPPEND:-}" \
    -drive file="$OVERLAY",format=qcow2,if=virtio,cache=unsafe,discard=unmap \
    -netdev user,id=n0,hostfwd=tcp:127.0.0.1:"$PORT"-:22,hostfwd=tcp:127.0.0.1:"$POKE_PORT"-:8000 -device virtio-net-pci,netdev=n0,romfile= \
    -device virtio-rng-pci \
    -display none -monitor none -chardev file,id=ser0,path="$CONSOLE",append=on -serial chardev:ser0 \
    -daemonize -pidfile "$PIDFILE" </dev/null >"$DIR/qemu.log" 2>&1 9>&- \
    || { cat "$DIR/qemu.log" >&2; die "qemu failed to start"; }
  log "qemu started (pid $(cat "$PIDFILE"), ${CPUS} vCPUs TCG, ${MEM} MiB, ssh on 127.0.0.1:$PORT, guest :8000 on 127.0.0.1:$POKE_PORT)"
}

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/${1:-$PORT}") 2>/dev/null; }

# wait up to $1 s for qemu to exit; 1 if it is still running
wait_exit() {
  local pid deadline=$((SECONDS + $1))
  pid=$(vm_pid) || return 0
  while kill -0 "$pid" 2>/dev/null; do ((SECONDS < deadline)) || return 1; sleep 0.2; done
  # the forwarded port is closed by the exiting qemu; make sure it is free for the next start
  while ! port_free && ((SECONDS < deadline + 5)); do sleep 0.2; done
}

vm_up() {
  build_image
  if vm_running; then
    if ssh_root_n true 2>/dev/null; then die "a VM from $DIR is already running (pid $(vm_pid), port $PORT); 'vm.sh down' first"; fi
    log "killing a stale VM (pid $(vm_pid)) that does not answer ssh"; kill_vm
  fi
  rm -f "$PIDFILE" "$OVERLAY"
  local t attempt
  # A TCG guest was seen to hang early in the kernel now and then (console stops after "pnp: PnP
  # ACPI"); a second cold start from a fresh overlay boots.
  for attempt in 1 2; do
    rm -f "$OVERLAY"
    qemu-img create -q -f qcow2 -b "$BASE/disk.raw" -F raw "$OVERLAY"   # every run starts from the pristine image
    : >"$CONSOLE"
    t=$(now)
    start_qemu
    if wait_up; then log "boot: $(since "$t") s (qemu start to systemd up)"; return 0; fi
    console_tail; kill_vm
    log "boot attempt $attempt failed after $(since "$t") s"
  done
  die "boot failed"
}

vm_down() {
  local pid; pid=$(vm_pid) || { log "no VM running"; rm -f "$PIDFILE"; return 0; }
  local t; t=$(now)
  timeout 15 ssh "${SSH_ROOT[@]}" -p "$PORT" -n root@127.0.0.1 'systemctl poweroff' >/dev/null 2>&1 || true
  if ! wait_exit 30; then
    log "qemu still running after 30 s; killing it"; console_tail 15; kill_vm
    log "shutdown: $(since "$t") s (killed)"
  else
    rm -f "$PIDFILE"; log "shutdown: $(since "$t") s"
  fi
}

# `systemctl reboot` in the guest; qemu exits (-no-reboot) and is started again on the same disk.
# Also brings the VM back if the guest rebooted itself (qemu gone, disk still there).
vm_reboot() {
  [[ -f $OVERLAY ]] || die "no VM disk ($OVERLAY); use 'vm.sh up'"
  local t t2; t=$(now)
  if vm_running; then
    timeout 15 ssh "${SSH_ROOT[@]}" -p "$PORT" -n root@127.0.0.1 'systemctl reboot' >/dev/null 2>&1 || true
    if ! wait_exit 60; then log "guest did not go down within 60 s; killing qemu"; console_tail 15; kill_vm; fi
    log "reboot: guest down after $(since "$t") s"
  else
    log "no VM running; starting it again on its disk"
  fi
  rm -f "$PIDFILE"; t2=$(now)
  echo "==== vm.sh reboot $(date -Is)" >>"$CONSOLE"
  start_qemu
  if ! wait_up; then console_tail; die "reboot failed after $(since "$t") s"; fi
  log "reboot: $(since "$t") s (boot $(since "$t2") s)"
}

vm_status() {
  if image_ok; then echo "image: $BASE ($(sed -n 's/^built //p' "$BASE/info" 2>/dev/null))"
  elif [[ -e $BASE/stamp ]]; then echo "image: $BASE is outdated (recipe changed)"
  else echo "image: none"; fi
  local pid; pid=$(vm_pid) || { echo "vm: not running"; return 3; }
  local st; st=$(timeout 20 ssh "${SSH_ROOT[@]}" -p "$PORT" -n root@127.0.0.1 systemctl is-system-running 2>/dev/null) || true
  echo "vm: running, qemu pid $pid, ssh 127.0.0.1:$PORT, systemd: ${st:-no answer}"
  [[ -n $st ]]
}

lock() {   # serialise image/up/down/reboot for one directory
  mkdir -p "$DIR"; exec 9>"$DIR/.lock"
  flock -n 9 || { log "waiting for another vm.sh on $DIR"; flock -w 1800 9 || die "lock timeout"; }
}

# ---------------------------------------------------------------- main
cmd=${1:-}; shift || true
case $cmd in
  image) lock; build_image ;;
  up) lock; vm_up ;;
  down) lock; vm_down ;;
  reboot) lock; vm_reboot ;;
  status) vm_status ;;
  ssh)
    (($#)) || exec ssh "${SSH_ROOT[@]}" -p "$PORT" root@127.0.0.1
    exec ssh "${SSH_ROOT[@]}" -p "$PORT" root@127.0.0.1 -- "$(remote_cmd "$@")" ;;
  ssh-user)
    (($# >= 3)) || die "usage: vm.sh ssh-user USER KEYFILE CMD..."
    user=$1 key=$2; shift 2
    [[ -r $key ]] || die "cannot read key file $key"
    if [[ $(stat -c %a "$key") != [46]00 ]]; then   # ssh refuses private keys others can read
      tmpkey=$(mktemp); trap 'rm -f "$tmpkey"' EXIT; cat "$key" >"$tmpkey"; key=$tmpkey
    fi
    rc=0; ssh "${SSH_COMMON[@]}" -i "$key" -p "$PORT" "$user@127.0.0.1" -- "$(remote_cmd "$@")" || rc=$?
    exit "$rc" ;;
  put) (($# == 2)) || die "usage: vm.sh put SRC DEST"
    exec scp -q -r "${SSH_ROOT[@]}" -P "$PORT" -- "$1" "root@127.0.0.1:$2" ;;
  get) (($# == 2)) || die "usage: vm.sh get SRC DEST"
    exec scp -q -r "${SSH_ROOT[@]}" -P "$PORT" -- "root@127.0.0.1:$1" "$2" ;;
  *) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2 ;;
esac
