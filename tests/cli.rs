//! The command-line client against a real `kloigos serve`: tables, `--json`, and errors.

mod common;

use common::{HOST, Server, ssh_key};
use serde_json::{Value, json};

#[test]
fn cli_tables_json_and_errors() {
    if !common::privileged(&[]) {
        return;
    }
    let s = Server::start();
    let out = s.cli(&[
        "init-server",
        "--hostname",
        HOST,
        "--ip",
        "192.0.2.10",
        "--region",
        "eu",
        "--zone",
        "a",
        "0-7",
        "8-15",
    ]);
    assert!(out.status.success(), "{out:?}");
    let out = s.cli(&["units"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.starts_with("COMPUTE_ID"), "{table}");
    assert!(
        table.contains("testhost_8-15") && table.contains("FREE"),
        "{table}"
    );
    let keyfile = s.dir.path().join("id.pub");
    std::fs::write(&keyfile, format!("{}\n", ssh_key("cli"))).unwrap();
    let out = s.cli(&[
        "--json",
        "allocate",
        "--cpu-count",
        "8",
        "--ssh-key",
        keyfile.to_str().unwrap(),
        "--tag",
        "deployment_id=d9",
        "--tag",
        "n:=5",
    ]);
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["status"].clone(), v["tags"]["n"].clone()),
        (json!("ALLOCATED"), json!(5))
    );
    // An API error is a message on stderr and a non-zero exit.
    let out = s.cli(&[
        "allocate",
        "--cpu-count",
        "3",
        "--ssh-key",
        keyfile.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no FREE compute unit"),
        "{out:?}"
    );
    let out = s.cli(&["allocate", "--ssh-key", "ssh-ed25519 AAAAnope"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ssh_public_key"),
        "{out:?}"
    );
    let out = s.cli(&["deallocate", "testhost_0-7"]);
    assert!(out.status.success(), "{out:?}");
    let out = s.cli(&["events", "--operation", "deallocate"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("testhost_0-7"),
        "{out:?}"
    );
    let out = s.cli(&["decommission", HOST]);
    assert!(out.status.success(), "{out:?}");
    // No server to talk to: a clear message.
    let out = std::process::Command::new(common::bin())
        .args(["--socket", "/nonexistent/k.sock", "units"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot connect"),
        "{out:?}"
    );
}
