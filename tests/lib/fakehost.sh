# shellcheck shell=bash
# A kloigos server on a fake host, for the browser and fuzz suites (sourced; needs $repo):
#
#   fakehost_start HOST ONLINE NODE0 NODE1   builds kloigos ($bin), makes $tmp (removed at exit,
#                                            with the server) holding a fake root $root: CPUs
#                                            ONLINE on two NUMA nodes with cpulists NODE0 and NODE1
#   fakehost_serve                           serves it over TCP on a free port ($url, $server_pid)
#                                            with the tokens in $tokens, and waits until it answers
#
# Tokens go in $tokens before fakehost_serve: `KLOIGOS_TOKENS="$tokens" "$bin" token create ...`.

fakehost_cleanup() {
  if [ -n "${server_pid:-}" ]; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$tmp"
}

fakehost_start() {
  echo "# cargo build"
  (cd "$repo" && cargo build --quiet)
  bin="$repo/target/debug/kloigos"
  tmp="$(mktemp -d)"
  server_pid=""
  trap fakehost_cleanup EXIT
  host=$1
  root="$tmp/root"
  tokens="$tmp/tokens"
  mkdir -p "$root/etc/skel" "$root/sys/devices/system/cpu" "$root/proc/sys/net/ipv4" \
    "$root/sys/devices/system/node/node0" "$root/sys/devices/system/node/node1"
  echo "$host" >"$root/etc/hostname"
  echo "$2" >"$root/sys/devices/system/cpu/online"
  echo "$3" >"$root/sys/devices/system/node/node0/cpulist"
  echo "$4" >"$root/sys/devices/system/node/node1/cpulist"
  printf '32768\t60999\n' >"$root/proc/sys/net/ipv4/ip_local_port_range"
  echo '# skel' >"$root/etc/skel/.bashrc"
}

fakehost_serve() {
  local port
  port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  url="http://127.0.0.1:$port"
  KLOIGOS_LOG=warn "$bin" serve --listen "127.0.0.1:$port" --root "$root" --db "$tmp/kloigos.db" \
    --templates "$repo/templates" --tokens "$tokens" >"$tmp/serve.log" 2>&1 &
  server_pid=$!
  for _ in $(seq 1 100); do
    curl -sf "$url/healthz" >/dev/null 2>&1 && return 0
    kill -0 "$server_pid" 2>/dev/null || { cat "$tmp/serve.log"; echo "kloigos serve exited"; exit 1; }
    sleep 0.1
  done
}
