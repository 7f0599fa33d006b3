//! Golden-directory tests of everything Kloigos renders. Each `tests/golden/NN-case/` holds:
//! - `case.json`: `{"init": <init_server body>, "allocate": [<allocate bodies>], "deallocate": [ids]}`,
//!   optionally `"socket_bind": true` (a host whose systemd has BPF) and `"decommission":
//!   {"hostname": ..., "force": bool}` (run last: `expected/` is what remains after).
//! - `root/`: the host before (sysfs topology, /etc/hostname, /etc/skel, ...)
//! - `templates/` (optional): an admin's overrides, as in /etc/kloigos/templates
//! - `removed` (optional): the files of `root/` Kloigos removed, one a line (none otherwise);
//! - `expected/`: every file Kloigos wrote, compared as text: the state file
//!   `etc/kloigos/host.json`, the drop-ins the generator made of it under
//!   `run/systemd/generator/` (a fake root's daemon-reload runs the generator in-process),
//!   tmpfiles.d, the nftables table, keys, lingering. A difference is shown as a unified diff.
//!
//! The case runs through the same request parsing and service code as the API, against a copy
//! of `root/`. `UPDATE_GOLDEN=1 cargo test --test golden` rewrites `expected/` for review.

mod common;

use common::{golden, tree};
use kloigos::service::{Config, Kloigos};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn copy(from: &Path, to: &Path) {
    for (rel, content) in tree(from) {
        let dst = to.join(rel);
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::write(dst, content).unwrap();
    }
}

fn run_case(case: &Path) -> Result<(), String> {
    let spec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(case.join("case.json")).unwrap()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    copy(&case.join("root"), &root);
    let before = tree(&root);
    let mut k = Kloigos::open(&Config {
        db: kloigos::store::DbTarget::Sqlite(tmp.path().join("k.db")),
        root: root.clone(),
        templates: vec![case.join("templates")],
        hostname: None,
        kill_grace: std::time::Duration::ZERO,
        host_stale_after: std::time::Duration::from_secs(300),
    })
    .map_err(|e| e.to_string())?;
    if spec["socket_bind"] == serde_json::json!(true) {
        k.set_socket_bind(true);
    }
    let body = axum::body::Bytes::from(spec["init"].to_string());
    let init = kloigos::api::parse_init_server(&body).map_err(|e| format!("{e:?}"))?;
    k.init_server(init, "golden").map_err(|e| e.to_string())?;
    for a in spec["allocate"].as_array().into_iter().flatten() {
        let req = kloigos::api::parse_allocate(&axum::body::Bytes::from(a.to_string()))
            .map_err(|e| format!("{e:?}"))?;
        k.allocate(req, "golden").map_err(|e| e.to_string())?;
    }
    for d in spec["deallocate"].as_array().into_iter().flatten() {
        k.deallocate(d.as_str().unwrap(), "golden", &|_| Ok(()))
            .map_err(|e| e.to_string())?;
    }
    if let Some(d) = spec.get("decommission") {
        k.decommission(
            d["hostname"].as_str().unwrap(),
            d["force"].as_bool().unwrap_or(false),
            "golden",
        )
        .map_err(|e| e.to_string())?;
    }
    // What Kloigos removed of the host before: only what `removed` lists (one path a line).
    let now = tree(&root);
    let removed: Vec<&String> = before.keys().filter(|p| !now.contains_key(*p)).collect();
    let want_removed = std::fs::read_to_string(case.join("removed")).unwrap_or_default();
    let want_removed: Vec<&str> = want_removed.lines().filter(|l| !l.is_empty()).collect();
    let mut problems = Vec::new();
    if removed != want_removed {
        problems.push(format!(
            "removed from the host: {removed:?}, expected {want_removed:?}"
        ));
    }
    // What Kloigos wrote: every file that is new or changed.
    let after: BTreeMap<String, String> = tree(&root)
        .into_iter()
        .filter(|(p, c)| before.get(p) != Some(c))
        .collect();
    if !golden(&case.join("expected"), &after, &mut problems) {
        return Ok(());
    }
    // Running reconcile over the result must change nothing: the render is stable.
    let report = k.reconcile("golden").map_err(|e| e.to_string())?;
    if !report.is_clean() {
        problems.push(format!(
            "reconcile after the case was not clean: {report:?}"
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n"))
    }
}

#[test]
fn golden_cases() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("case.json").exists())
        .collect();
    cases.sort();
    assert!(
        cases.len() >= 7,
        "golden cases missing in {}",
        dir.display()
    );
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|c| {
            run_case(c)
                .err()
                .map(|e| format!("== {}:\n{e}", c.display()))
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
