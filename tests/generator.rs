//! Golden tests of the real `kloigos-generator` binary, run as systemd runs it (zram-generator
//! style). Each `tests/generator/NN-case/` is a root:
//! - `etc/kloigos/host.json` (optional: without it nothing is generated), optional template
//!   layers `usr/lib/kloigos/templates/` and `etc/kloigos/templates/`;
//! - `expected/`: the normal output directory afterwards (missing = empty);
//! - `stderr` (optional): lines that must each appear in what the generator printed.
//!
//! The generator must exit 0 and write nothing in the early and late directories.
//! `UPDATE_GOLDEN=1 cargo test --test generator` rewrites `expected/` for review.

mod common;

use common::{golden, tree};
use std::path::{Path, PathBuf};
use std::process::Command;

fn run_case(case: &Path) -> Result<(), String> {
    let tmp = tempfile::tempdir().unwrap();
    let [normal, early, late] = ["normal", "early", "late"].map(|d| tmp.path().join(d));
    for d in [&normal, &early, &late] {
        std::fs::create_dir(d).unwrap();
    }
    let out = Command::new(env!("CARGO_BIN_EXE_kloigos-generator"))
        .args([&normal, &early, &late])
        .env("KLOIGOS_GENERATOR_ROOT", case)
        .env_remove("SYSTEMD_SCOPE")
        .output()
        .map_err(|e| e.to_string())?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mut problems = Vec::new();
    if !out.status.success() {
        problems.push(format!("exit status {} ({stderr})", out.status));
    }
    if let Ok(want) = std::fs::read_to_string(case.join("stderr")) {
        for line in want.lines().filter(|l| !l.is_empty()) {
            if !stderr.contains(line) {
                problems.push(format!("stderr lacks {line:?}:\n{stderr}"));
            }
        }
    } else if !stderr.is_empty() {
        problems.push(format!("unexpected messages:\n{stderr}"));
    }
    for d in [&early, &late] {
        if std::fs::read_dir(d).unwrap().next().is_some() {
            problems.push(format!("wrote into {}", d.display()));
        }
    }
    let got = tree(&normal);
    if !golden(&case.join("expected"), &got, &mut problems) {
        return Ok(());
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n"))
    }
}

#[test]
fn generator_cases() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/generator");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    cases.sort();
    assert!(
        cases.len() >= 5,
        "generator cases missing in {}",
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

/// The generator's output for a state file the service wrote is the drop-ins the service
/// expects: the golden cases of the service and of the generator agree.
#[test]
fn generator_output_matches_the_service_golden_drop_ins() {
    let base = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests");
    let service = tree(&base.join("golden/01-two-numa-nodes/expected/run/systemd/generator"));
    let generator = tree(&base.join("generator/01-two-units/expected"));
    assert!(!service.is_empty());
    assert_eq!(service, generator);
}

/// Without arguments it is a usage error, not a silent success.
#[test]
fn usage_error_without_an_output_directory() {
    let out = Command::new(env!("CARGO_BIN_EXE_kloigos-generator"))
        .env_remove("SYSTEMD_SCOPE")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("usage"));
}
