//! The API while its PostgreSQL inventory is down: 503 with a JSON detail, then service
//! resumes by itself. Runs only with `KLOIGOS_TEST_BACKEND=postgres` (scripts/test.sh's
//! PostgreSQL pass), alone in its binary because it stops the shared test cluster.

mod common;

use common::{Server, alloc_body, ssh_key};
use serde_json::json;
use std::process::Command;
use std::time::{Duration, Instant};

fn pg_ctl(action: &str) {
    let ctl =
        std::env::var("KLOIGOS_TEST_PG_CTL").expect("KLOIGOS_TEST_PG_CTL (scripts/lib/pg.sh)");
    let mut words = ctl.split_whitespace();
    let mut cmd = Command::new(words.next().expect("pg_ctl command"));
    cmd.args(words).arg(action);
    if action == "stop" {
        cmd.args(["-m", "fast"]);
    }
    let out = cmd.output().expect("run pg_ctl");
    assert!(out.status.success(), "pg_ctl {action}: {out:?}");
}

#[test]
fn database_outage_gives_503_then_service_resumes() {
    if !std::env::var("KLOIGOS_TEST_BACKEND").is_ok_and(|v| v == "postgres") {
        eprintln!(
            "SKIP database_outage_gives_503_then_service_resumes: the API suite runs on SQLite \
             (KLOIGOS_TEST_BACKEND=postgres selects PostgreSQL)"
        );
        return;
    }
    if !common::privileged(&[]) {
        return;
    }
    let s = Server::start();
    s.init(&["0-3", "4-7"]);
    assert_eq!(s.get("/api/compute_units").0, 200);
    let key = ssh_key("alice@laptop");
    let body = alloc_body(json!(4), &key, json!({"deployment_id": "d"}));

    pg_ctl("stop");
    let listed = s.get("/api/compute_units");
    let allocated = s.call("POST", "/api/compute_units/allocate", Some(&body));
    pg_ctl("start");
    for (code, v) in [&listed, &allocated] {
        assert_eq!(*code, 503, "{v}");
        let detail = v["detail"].as_str().unwrap_or_default();
        assert!(detail.starts_with("database unavailable: "), "{v}");
    }

    // Back without a restart of kloigos: the pool reconnects.
    let t = Instant::now();
    loop {
        let (code, v) = s.get("/api/compute_units");
        if code == 200 {
            assert_eq!(v.as_array().map(Vec::len), Some(2), "{v}");
            break;
        }
        assert_eq!(code, 503, "{v}");
        assert!(t.elapsed() < Duration::from_secs(15), "still {code} {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, a) = s.call("POST", "/api/compute_units/allocate", Some(&body));
    assert_eq!(code, 200, "{a}");
    assert_eq!(a["status"], "ALLOCATED");
}
