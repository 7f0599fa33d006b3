# shellcheck shell=bash
# A throw-away PostgreSQL cluster for the tests (Debian's `postgresql` package), sourced by
# scripts/test.sh and usable by hand:
#
#   . scripts/lib/deps.sh; . scripts/lib/pg.sh
#   pg_start        # installs postgresql if needed, starts a cluster in a temp directory
#   ...             # KLOIGOS_TEST_PG=postgresql://kloigos:PW@127.0.0.1:PORT (no database)
#   pg_stop         # stops it and removes the directory
#
# The cluster runs as an unprivileged user (`nobody` when we are root: initdb refuses root),
# listens on 127.0.0.1 on a free port and on a unix socket in its directory, with TLS on
# (a CA and a server certificate for 127.0.0.1/localhost made here with openssl). Exported:
#   KLOIGOS_TEST_PG         base URL of a superuser (append /DBNAME and ?sslmode=...)
#   KLOIGOS_TEST_PG_CA      the CA certificate (for sslmode=verify-full&sslrootcert=)
#   KLOIGOS_TEST_PG_SOCKET  the unix socket directory
#   KLOIGOS_TEST_PG_CTL     "pg_ctl -D DATA" run as the cluster's user (the outage tests stop
#                           and start it with `$KLOIGOS_TEST_PG_CTL stop|start`)
# Nothing is downloaded at run time besides the apt package.

pg_bin() {
  local d
  for d in /usr/lib/postgresql/*/bin; do [[ -x $d/initdb ]] && echo "$d"; done | sort -V | tail -1
}

pg_start() {
  [[ -n $(pg_bin) ]] || deps_install postgresql || return 1
  deps_need psql:postgresql-client openssl:openssl || return 1
  local bin dir port pw as=()
  bin=$(pg_bin)
  [[ -n $bin ]] || { echo "pg: no initdb under /usr/lib/postgresql" >&2; return 1; }
  dir=$(mktemp -d "${TMPDIR:-/tmp}/kloigos-pg.XXXXXX")
  PG_TEST_DIR=$dir
  if ((EUID == 0)); then
    chown nobody: "$dir"
    as=(runuser -u nobody --)
  fi
  chmod 0755 "$dir"
  pw=$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  # TLS: a CA and a server certificate for the addresses the tests connect to.
  (
    cd "$dir" &&
      openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=kloigos test CA" \
        -keyout ca.key -out ca.crt 2>/dev/null &&
      openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
        -keyout server.key -out server.csr 2>/dev/null &&
      printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >san.ext &&
      openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
        -extfile san.ext -out server.crt 2>/dev/null &&
      chmod 0644 ca.crt && chmod 0600 server.key && rm -f ca.key server.csr san.ext
  ) || { echo "pg: cannot make the TLS certificates" >&2; return 1; }
  printf '%s\n' "$pw" >"$dir/pw"
  mkdir -p "$dir/sock"
  ((EUID == 0)) && chown -R nobody: "$dir"
  "${as[@]}" "$bin/initdb" -D "$dir/data" -U kloigos --pwfile="$dir/pw" -A scram-sha-256 \
    --auth-local=trust -E UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 ||
    { cat "$dir/initdb.log" >&2; return 1; }
  cat >>"$dir/data/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$dir/sock'
ssl = on
ssl_cert_file = '$dir/server.crt'
ssl_key_file = '$dir/server.key'
max_connections = 400
fsync = off
synchronous_commit = off
full_page_writes = off
EOF
  KLOIGOS_TEST_PG_CTL="${as[*]} $bin/pg_ctl -D $dir/data -l $dir/log -w -t 30"
  $KLOIGOS_TEST_PG_CTL start >/dev/null || { cat "$dir/log" >&2; return 1; }
  export KLOIGOS_TEST_PG="postgresql://kloigos:$pw@127.0.0.1:$port"
  export KLOIGOS_TEST_PG_CA=$dir/ca.crt
  export KLOIGOS_TEST_PG_SOCKET=$dir/sock
  export KLOIGOS_TEST_PG_CTL
  echo "pg: PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$port and $dir/sock" >&2
}

pg_stop() {
  [[ -n ${PG_TEST_DIR:-} && -d $PG_TEST_DIR ]] || return 0
  $KLOIGOS_TEST_PG_CTL stop -m immediate >/dev/null 2>&1 || true
  rm -rf "$PG_TEST_DIR"
  unset PG_TEST_DIR KLOIGOS_TEST_PG KLOIGOS_TEST_PG_CA KLOIGOS_TEST_PG_SOCKET KLOIGOS_TEST_PG_CTL
}
