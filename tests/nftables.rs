//! The rendered nftables table against the real kernel, in a throw-away network namespace
//! (`unshare -n`): every golden table loads, and the port fence does what it promises.
//! Needs root, `unshare` and `nft` (the test scripts install nftables); skipped with a message
//! where they are missing (see `common::privileged`).

mod common;

use std::path::PathBuf;
use std::process::Command;

fn privileged() -> bool {
    common::privileged(&["unshare", "nft", "setpriv", "python3"])
}

#[test]
fn every_golden_table_loads() {
    if !privileged() {
        return;
    }
    let golden = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut n = 0;
    for case in std::fs::read_dir(&golden).unwrap() {
        let f = case
            .unwrap()
            .path()
            .join("expected/var/lib/kloigos/kloigos.nft");
        if !f.exists() {
            continue;
        }
        n += 1;
        // Load it twice: the second load must replace the table atomically, not fail on it.
        let script = format!(
            "nft -f {0} && nft -f {0} && nft list table inet kloigos",
            f.display()
        );
        let out = Command::new("unshare")
            .args(["-n", "sh", "-c", &script])
            .output()
            .expect("unshare");
        assert!(
            out.status.success(),
            "{}: {}",
            f.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("meta skuid . th sport != @unit_ports")
        );
    }
    assert!(n >= 4, "golden nft files not found");
}

/// Unit A (uid 20000, CPUs 0-3, ports 2000-2399) and unit B (uid 20004, ports 2400-2799):
/// A serves on its own port: reachable by root and by B; on B's port or outside any range:
/// not reachable; A's outgoing connections still work.
#[test]
fn port_fence_in_a_network_namespace() {
    if !privileged() {
        return;
    }
    let s = common::Server::start();
    s.init(&["0-3", "4-7"]);
    let nft = s.root().join("var/lib/kloigos/kloigos.nft");
    let script = format!(
        r#"
set -e
ip link set lo up
nft -f {nft}
py=/usr/bin/python3
serve() {{ setpriv --reuid $1 --regid $1 --clear-groups $py -c "
import socket
s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1', $2)); s.listen(8); s.settimeout(8)
try:
    for _ in range($3):
        c, _ = s.accept(); c.sendall(b'hello'); c.close()
except Exception: pass
" & sleep 0.4; }}
probe() {{ setpriv --reuid $1 --regid $1 --clear-groups $py -c "
import socket
try:
    s=socket.create_connection(('127.0.0.1', $2), timeout=1.5); s.settimeout(1.5); print('open' if s.recv(5)==b'hello' else 'silent')
except Exception as e: print('closed')
"; }}
serve 20000 2100 3
echo "own-port root=$(probe 0 2100) other-unit=$(probe 20004 2100) self=$(probe 20000 2100)"
serve 20000 2500 1
echo "other-units-port root=$(probe 0 2500)"
serve 20000 9000 1
echo "outside root=$(probe 0 9000)"
serve 0 7000 1
echo "outgoing unit-to-root=$(probe 20000 7000)"
wait
"#,
        nft = nft.display()
    );
    let out = Command::new("unshare")
        .args(["-n", "bash", "-c", &script])
        .output()
        .expect("unshare");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "own-port root=open other-unit=open self=open",
        "other-units-port root=closed",
        "outside root=closed",
        "outgoing unit-to-root=open",
    ] {
        assert!(stdout.contains(want), "expected {want:?} in:\n{stdout}");
    }
}
