# shellcheck shell=bash
# Host packages for the test and build scripts, sourced by every script that installs something
# (scripts/test.sh, scripts/package.sh, tests/vm/vm.sh, tests/vm/e2e.sh, tests/browser/run.sh, and
# tests/vm/guest.sh inside the VM).
#
#   deps_need CMD:PKG...   install PKG for every CMD missing from PATH (one apt transaction)
#   deps_install PKG...    install Debian packages
#   deps_qemu              qemu-system-x86, qemu-utils and debootstrap, from one qemu release
#   deps_apt ARGS...       any other apt-get call (tests/vm/guest.sh installs the package with it)
#
# On a fresh machine: apt waits for the dpkg lock (other apt jobs run at boot) instead of failing,
# and `apt-get update` runs at most once per run (KLOIGOS_APT_UPDATED is exported to the child
# scripts). Without root, apt-get runs through sudo.
export LC_ALL=C
PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin
DEPS_APT=(apt-get -o DPkg::Lock::Timeout="${KLOIGOS_APT_LOCK_TIMEOUT:-600}" -q)

deps_log() { echo "deps: $*" >&2; }
deps_root() { if ((EUID == 0)); then "$@"; else sudo "$@"; fi; }

deps_apt_update() {
  [[ ${KLOIGOS_APT_UPDATED:-} == 1 ]] && return 0
  deps_log "apt-get update"
  deps_root "${DEPS_APT[@]}" update >/dev/null || return 1
  export KLOIGOS_APT_UPDATED=1
}

# deps_apt ARGS...: apt-get ARGS, waiting for the dpkg lock, non-interactive
deps_apt() {
  deps_root env DEBIAN_FRONTEND=noninteractive "${DEPS_APT[@]}" "$@"
}

# deps_install [apt-get install options] PKG...
deps_install() {
  deps_apt_update || return 1
  deps_log "apt-get install $*"
  local log rc=0
  log=$(mktemp "${TMPDIR:-/tmp}/kloigos-apt.XXXXXX")
  deps_apt install -y "$@" >"$log" 2>&1 || rc=$?
  # what apt changed (a downgrade of a backported qemu-utils shows here), or why it failed
  if ((rc)); then tail -25 "$log" >&2; else grep -E '^(The following|  |[0-9]+ upgraded)|DOWNGRAD' "$log" >&2; fi
  rm -f "$log"
  return "$rc"
}

deps_need() {
  local pair pkgs=()
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || pkgs+=("${pair#*:}")
  done
  ((${#pkgs[@]})) || return 0
  # shellcheck disable=SC2046
  deps_install $(printf '%s\n' "${pkgs[@]}" | sort -u)
}

# qemu-system-x86 and qemu-utils must come from the same qemu release: a machine image may ship a
# backported qemu-utils (1:10.x~bpo12) with no backports source configured, which Breaks
# bookworm's qemu-system-common. Both are pinned to qemu-system-x86's candidate version, which
# downgrades such a qemu-utils and is a plain install on a machine without any qemu.
deps_qemu() {
  local have=1 cmd
  for cmd in qemu-system-x86_64 qemu-img debootstrap mkfs.ext4 ssh scp ssh-keygen; do
    command -v "$cmd" >/dev/null 2>&1 || have=0
  done
  ((have)) && return 0
  deps_apt_update || return 1
  local ver
  ver=$(apt-cache policy qemu-system-x86 | awk '$1 == "Candidate:" { print $2 }')
  [[ -n $ver && $ver != "(none)" ]] || { deps_log "no installable qemu-system-x86 in the apt sources"; return 1; }
  local extra=()
  command -v debootstrap >/dev/null 2>&1 || extra+=(debootstrap)
  command -v mkfs.ext4 >/dev/null 2>&1 || extra+=(e2fsprogs)
  command -v ssh-keygen >/dev/null 2>&1 && command -v scp >/dev/null 2>&1 || extra+=(openssh-client)
  deps_install --no-install-recommends --allow-downgrades "qemu-system-x86=$ver" "qemu-utils=$ver" "${extra[@]}" || return 1
  for cmd in qemu-system-x86_64 qemu-img debootstrap; do
    command -v "$cmd" >/dev/null 2>&1 || { deps_log "$cmd still missing after the install"; return 1; }
  done
}
