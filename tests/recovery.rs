//! Recovery: a crash in the middle of an operation (`kill -9` in a `KLOIGOS_TEST_PAUSE` window),
//! a failed apply rolled back, drift repaired by `reconcile`, and a unit wrecked by its tenant that
//! never stops the service. Same harness as `api.rs`: a real `kloigos serve`, a temporary root.

mod common;

use common::{HOST, Server, alloc_body, files, ssh_key};
use serde_json::{Value, json};

/// Needs the `test-hooks` feature: the crash window is KLOIGOS_TEST_PAUSE.
#[cfg(feature = "test-hooks")]
#[test]
fn crash_mid_allocation_is_rolled_back_at_restart() {
    if !common::privileged(&[]) {
        return;
    }
    let mut s = Server::start_with_env(&[("KLOIGOS_TEST_PAUSE", "allocate:30")]);
    s.init(&["0-7", "8-15"]);
    let socket = s.socket.clone();
    let key = ssh_key("crash");
    let req = std::thread::spawn(move || {
        // The server dies under this request.
        let r = std::panic::catch_unwind(|| {
            common::http(
                &socket,
                "POST",
                "/api/compute_units/allocate",
                Some(&alloc_body(json!(8), &key, Value::Null)),
            )
        });
        r.is_err() || r.map(|(c, _)| c != 200).unwrap_or(true)
    });
    // Wait until the allocation is half done: ALLOCATING in the database, key on disk.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (_, v) = s.get("/api/compute_units/?status=ALLOCATING");
        if v.as_array().is_some_and(|a| a.len() == 1)
            && s.root().join("home/u0-7/.ssh/authorized_keys").exists()
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "allocation never reached the pause point"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    s.kill9();
    assert!(
        req.join().unwrap(),
        "the interrupted request did not succeed"
    );
    // Restart without the pause: reconcile at start rolls the unit back.
    s.extra_env.clear();
    s.spawn();
    let (_, units) = s.get("/api/compute_units/");
    for u in units.as_array().unwrap() {
        assert_eq!(u["status"], "FREE", "{u}");
    }
    // Files match the database: no key, no linger, tmpfiles without linger.
    assert!(!s.root().join("home/u0-7/.ssh/authorized_keys").exists());
    assert!(!s.root().join("var/lib/systemd/linger/u0-7").exists());
    assert!(
        !std::fs::read_to_string(s.root().join("etc/tmpfiles.d/kloigos-c0-7.conf"))
            .unwrap()
            .contains("linger")
    );
    let (_, ev) = s.get("/api/events?operation=reconcile");
    assert_eq!(ev[0]["compute_id"], "testhost_0-7", "{ev}");
    assert_eq!(ev[0]["before"]["status"], "ALLOCATING");
    // And the unit can be allocated normally now.
    let (code, v) = s.call(
        "POST",
        "/api/compute_units/allocate",
        Some(&alloc_body(json!(8), &ssh_key("again"), Value::Null)),
    );
    assert_eq!(
        (code, v["compute_id"].clone()),
        (200, json!("testhost_0-7")),
        "{v}"
    );
    // A second reconcile (from the CLI, as an admin would run it) finds nothing to do.
    s.kill9();
    let out = s.reconcile(&[]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "reconcile: nothing to do"
    );
}

#[test]
fn failed_apply_is_rolled_back_and_audited() {
    if !common::privileged(&[]) {
        return;
    }
    let s = Server::start();
    // init_server fails on the host (tmpfiles.d is not a directory): nothing is left behind.
    common::write(&s.root().join("etc/tmpfiles.d"), "not a directory");
    let body = json!({"ip": "192.0.2.10", "region": "eu", "zone": "a", "hostname": HOST, "cpu_ranges": ["0-3", "4-7"]});
    let (code, v) = s.call("POST", "/api/admin/init_server", Some(&body.to_string()));
    assert_eq!(code, 500, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("rolled back"), "{v}");
    assert_eq!(s.get("/api/admin/servers").1, json!([]));
    assert_eq!(
        files(&s.root()),
        ["etc/hostname", "etc/skel/.bashrc", "etc/tmpfiles.d"]
    );
    let (_, ev) = s.get("/api/events?operation=init_server");
    assert_eq!(
        (ev[0]["result"].as_str(), ev[0]["actor"].is_string()),
        (Some("error"), true),
        "{ev}"
    );
    std::fs::remove_file(s.root().join("etc/tmpfiles.d")).unwrap();
    s.init(&["0-3", "4-7"]);

    // allocate fails (the owner-to-be's key file is a directory nobody may replace
    // blindly): the unit is FREE again, the failure is audited, and the next allocation works.
    let ssh_dir = s.root().join("home/u0-3/.ssh");
    std::fs::create_dir_all(ssh_dir.join("authorized_keys/sub")).unwrap();
    let (code, v) = s.call(
        "POST",
        "/api/compute_units/allocate",
        Some(&alloc_body(json!(4), &ssh_key("a"), json!({"owner": "a"}))),
    );
    assert_eq!(code, 500, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("rolled back"), "{v}");
    let (_, u) = s.get("/api/compute_units/testhost_0-3");
    assert_eq!(
        (u["status"].clone(), u["tags"].clone()),
        (json!("FREE"), Value::Null)
    );
    let (_, ev) = s.get("/api/events?operation=allocate");
    assert_eq!(
        (ev[0]["result"].as_str(), ev[0]["after"]["status"].as_str()),
        (Some("error"), Some("FREE")),
        "{ev}"
    );
    // A .ssh swapped for a symlink is replaced by a real directory, never followed.
    let outside = s.dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::remove_dir_all(&ssh_dir).unwrap();
    std::os::unix::fs::symlink(&outside, &ssh_dir).unwrap();
    let (code, v) = s.call(
        "POST",
        "/api/compute_units/allocate",
        Some(&alloc_body(json!(4), &ssh_key("b"), Value::Null)),
    );
    assert_eq!(
        (code, v["compute_id"].clone()),
        (200, json!("testhost_0-3")),
        "{v}"
    );
    assert!(s.root().join("home/u0-3/.ssh/authorized_keys").is_file());
    assert!(std::fs::symlink_metadata(&ssh_dir).unwrap().is_dir());
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "nothing written through the link"
    );
}

#[test]
fn reconcile_repairs_drift() {
    if !common::privileged(&[]) {
        return;
    }
    let mut s = Server::start();
    s.init(&["0-7", "8-15"]);
    let key = ssh_key("drift");
    let (code, _) = s.call(
        "POST",
        "/api/compute_units/allocate",
        Some(&alloc_body(json!(8), &key, Value::Null)),
    );
    assert_eq!(code, 200);
    s.kill9();
    let r = s.root();
    let slice = r.join("run/systemd/generator/user-20008.slice.d/50-kloigos.conf");
    let good_slice = std::fs::read_to_string(&slice).unwrap();
    let nft = r.join("var/lib/kloigos/kloigos.nft");
    let good_nft = std::fs::read_to_string(&nft).unwrap();
    // Drift: an edited drop-in, a deleted tmpfiles.d file, a lost key, a stray key on a FREE
    // unit, a truncated table, and a stale drop-in of a unit that no longer exists.
    std::fs::write(&slice, "[Slice]\nAllowedCPUs=0-15\n").unwrap();
    std::fs::remove_file(r.join("etc/tmpfiles.d/kloigos-c0-7.conf")).unwrap();
    std::fs::remove_file(r.join("home/u0-7/.ssh/authorized_keys")).unwrap();
    common::write(
        &r.join("home/u8-15/.ssh/authorized_keys"),
        "ssh-ed25519 AAAA intruder\n",
    );
    std::fs::write(&nft, "").unwrap();
    common::write(
        &r.join("run/systemd/generator/user-29999.slice.d/50-kloigos.conf"),
        "[Slice]\n",
    );
    let reconcile = || {
        let out = s.reconcile(&["--json"]);
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let report = reconcile();
    assert_eq!(std::fs::read_to_string(&slice).unwrap(), good_slice);
    assert_eq!(std::fs::read_to_string(&nft).unwrap(), good_nft);
    assert!(r.join("etc/tmpfiles.d/kloigos-c0-7.conf").exists());
    assert_eq!(
        std::fs::read_to_string(r.join("home/u0-7/.ssh/authorized_keys")).unwrap(),
        format!("{key}\n")
    );
    assert!(!r.join("home/u8-15/.ssh/authorized_keys").exists());
    assert!(!r.join("run/systemd/generator/user-29999.slice.d").exists());
    let removed = report["files_removed"].as_array().unwrap();
    assert_eq!(
        removed,
        &vec![json!(
            "run/systemd/generator/user-29999.slice.d/50-kloigos.conf"
        )],
        "{report}"
    );
    assert_eq!(
        report["units_fixed"].as_array().unwrap().len(),
        2,
        "{report}"
    );
    // Idempotent: the second run finds nothing.
    let again = reconcile();
    for k in [
        "files_changed",
        "files_removed",
        "units_fixed",
        "servers_fixed",
    ] {
        assert_eq!(again[k], json!([]), "{again}");
    }
}

/// Needs the `test-hooks` feature: the crash window is KLOIGOS_TEST_PAUSE.
#[cfg(feature = "test-hooks")]
#[test]
fn crash_mid_init_server_is_finished_at_restart() {
    if !common::privileged(&[]) {
        return;
    }
    let mut s = Server::start_with_env(&[("KLOIGOS_TEST_PAUSE", "init_server:30")]);
    let socket = s.socket.clone();
    let body = json!({"ip": "192.0.2.10", "region": "eu", "zone": "a", "hostname": HOST, "cpu_ranges": ["0-7", "8-15"]}).to_string();
    let req = std::thread::spawn(move || {
        std::panic::catch_unwind(|| {
            common::http(&socket, "POST", "/api/admin/init_server", Some(&body))
        })
        .is_err()
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while s.get("/api/admin/servers").1[0]["status"] != "INITIALIZING" {
        assert!(
            std::time::Instant::now() < deadline,
            "init never reached the pause point"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(s.get("/api/compute_units/").1[0]["status"], "UNAVAILABLE");
    s.kill9();
    assert!(
        req.join().unwrap(),
        "the interrupted request did not succeed"
    );
    s.extra_env.clear();
    s.spawn();
    // Reconcile at start finished the init: the server is READY, its units FREE and on disk.
    let (_, servers) = s.get("/api/admin/servers");
    assert_eq!(servers[0]["status"], "READY", "{servers}");
    let (_, units) = s.get("/api/compute_units/?status=FREE");
    assert_eq!(units.as_array().unwrap().len(), 2, "{units}");
    for f in [
        "run/systemd/generator/user-20008.slice.d/50-kloigos.conf",
        "etc/tmpfiles.d/kloigos-c0-7.conf",
        "var/lib/kloigos/kloigos.nft",
    ] {
        assert!(s.root().join(f).exists(), "{f}");
    }
    let (_, ev) = s.get("/api/events?operation=reconcile");
    assert_eq!(
        (
            ev[0]["before"]["status"].as_str(),
            ev[0]["after"]["status"].as_str()
        ),
        (Some("INITIALIZING"), Some("READY")),
        "{ev}"
    );
    let (code, _) = s.call(
        "POST",
        "/api/compute_units/allocate",
        Some(&alloc_body(json!(8), &ssh_key("x"), Value::Null)),
    );
    assert_eq!(code, 200);
}

#[test]
fn a_wrecked_unit_never_stops_the_service() {
    if !common::privileged(&[]) {
        return;
    }
    let mut s = Server::start();
    s.init(&["0-3", "4-7", "8-11"]);
    for (i, who) in ["a", "b", "c"].iter().enumerate() {
        let (code, v) = s.call(
            "POST",
            "/api/compute_units/allocate",
            Some(&alloc_body(json!(4), &ssh_key(who), Value::Null)),
        );
        assert_eq!(code, 200, "{i}: {v}");
    }
    s.kill9();
    let r = s.root();
    // Tenants wreck their homes while the service is down.
    // u0-3: `rm -rf ~/.ssh; touch ~/.ssh`.
    let ssh0 = r.join("home/u0-3/.ssh");
    std::fs::remove_dir_all(&ssh0).unwrap();
    std::fs::write(&ssh0, "").unwrap();
    // u4-7: .ssh is a symlink to a directory of someone else's, the key is gone.
    let outside = s.dir.path().join("outside");
    common::write(&outside.join("authorized_keys"), "not yours\n");
    let ssh4 = r.join("home/u4-7/.ssh");
    std::fs::remove_dir_all(&ssh4).unwrap();
    std::os::unix::fs::symlink(&outside, &ssh4).unwrap();
    // u8-11: the key file is a directory; reconcile cannot put the key back by itself.
    let keys8 = r.join("home/u8-11/.ssh/authorized_keys");
    std::fs::remove_file(&keys8).unwrap();
    std::fs::create_dir_all(keys8.join("junk")).unwrap();

    // The service starts and serves anyway.
    s.spawn();
    let (code, units) = s.get("/api/compute_units/");
    assert_eq!(code, 200, "{units}");
    assert!(
        s.child.as_mut().unwrap().try_wait().unwrap().is_none(),
        "kloigos serve exited"
    );
    let by_id = |id: &str| {
        units
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["compute_id"] == id)
            .cloned()
            .unwrap()
    };
    // The repairable ones are repaired, through no link.
    for (id, who) in [("testhost_0-3", "a"), ("testhost_4-7", "b")] {
        assert_eq!(by_id(id)["problem"], Value::Null, "{units}");
        let user = by_id(id)["user"].as_str().unwrap().to_string();
        let ssh = r.join(format!("home/{user}/.ssh"));
        assert!(std::fs::symlink_metadata(&ssh).unwrap().is_dir(), "{id}");
        assert_eq!(
            std::fs::read_to_string(ssh.join("authorized_keys")).unwrap(),
            format!("{}\n", ssh_key(who))
        );
    }
    assert_eq!(
        std::fs::read_to_string(outside.join("authorized_keys")).unwrap(),
        "not yours\n"
    );
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 1);
    // The other one is marked, and the audit log says why.
    let broken = by_id("testhost_8-11");
    assert_eq!(broken["status"], "ALLOCATED", "{broken}");
    let problem = broken["problem"].as_str().unwrap_or_default().to_string();
    assert!(problem.contains("authorized_keys"), "{broken}");
    let failures = |s: &Server| {
        let (_, ev) = s.get("/api/events?operation=reconcile&compute_id=testhost_8-11");
        ev.as_array()
            .unwrap()
            .iter()
            .filter(|e| e["result"] == "error")
            .count()
    };
    assert_eq!(failures(&s), 1);
    // Restarting again does not flood the audit log with the same problem.
    s.kill9();
    s.spawn();
    assert_eq!(
        s.get("/api/compute_units/testhost_8-11").1["problem"],
        json!(problem)
    );
    assert_eq!(failures(&s), 1);
    // A hand-run reconcile says so, by its exit status too.
    let out = s.reconcile(&[]);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("FAILED: testhost_8-11"),
        "{out:?}"
    );
    assert_eq!(failures(&s), 1);

    // An admin deallocates it: a clean skeleton, the mark gone.
    let (code, v) = s.call(
        "DELETE",
        "/api/compute_units/deallocate/testhost_8-11",
        None,
    );
    assert_eq!(code, 200, "{v}");
    let (_, u) = s.get("/api/compute_units/testhost_8-11");
    assert_eq!(
        (u["status"].clone(), u["problem"].clone()),
        (json!("FREE"), Value::Null)
    );
    assert_eq!(
        files(&r.join("home/u8-11")),
        [".bashrc"],
        "only the skeleton is left"
    );
    assert!(r.join("home/u8-11/.ssh").is_dir());
    assert_eq!(
        std::fs::read_dir(r.join("home/u8-11/.ssh"))
            .unwrap()
            .count(),
        0
    );
}

/// A tenant's FUSE mount in its tree is answered by its own process, which may never answer:
/// the service does not enter such a tree (the host lock would hang), marks the unit and
/// serves the others; once the mount is gone the unit is repaired.
#[test]
fn a_fuse_mount_in_a_unit_is_not_entered() {
    if !common::privileged(&[]) {
        return;
    }
    let mut s = Server::start();
    s.init(&["0-3", "4-7"]);
    let (code, v) = s.call(
        "POST",
        "/api/compute_units/allocate",
        Some(&alloc_body(json!(4), &ssh_key("a"), Value::Null)),
    );
    assert_eq!(code, 200, "{v}");
    let id = v["compute_id"].as_str().unwrap().to_string();
    let home = s
        .root()
        .join(v["user"].as_str().map(|u| format!("home/{u}")).unwrap());
    s.kill9();
    // What reconcile would repair, under a (pretend) FUSE mount of the tenant's.
    std::fs::remove_dir_all(home.join(".ssh")).unwrap();
    let mountinfo = s.root().join("proc/self/mountinfo");
    common::write(
        &mountinfo,
        &format!(
            "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n40 22 0:35 / {} rw,nosuid - fuse.sshfs x rw,user_id=20000\n",
            home.strip_prefix(s.root())
                .map(|p| format!("/{}", p.display()))
                .unwrap()
        ),
    );
    s.spawn();
    let (code, u) = s.get(&format!("/api/compute_units/{id}"));
    assert_eq!(code, 200, "{u}");
    assert!(
        u["problem"].as_str().unwrap_or_default().contains("FUSE"),
        "{u}"
    );
    assert!(!home.join(".ssh").exists(), "the tree was entered");
    // The other unit is served.
    let (code, v) = s.call(
        "POST",
        "/api/compute_units/allocate",
        Some(&alloc_body(json!(4), &ssh_key("b"), Value::Null)),
    );
    assert_eq!(code, 200, "{v}");
    // Unmounted: repaired at the next start.
    std::fs::remove_file(&mountinfo).unwrap();
    s.kill9();
    s.spawn();
    let (_, u) = s.get(&format!("/api/compute_units/{id}"));
    assert_eq!(u["problem"], Value::Null, "{u}");
    assert!(home.join(".ssh/authorized_keys").exists());
}

/// A local allocation's concluding move and its audit row commit together: when the audit row
/// cannot be written (a trigger refuses it here), the unit does not move either; the caller
/// gets an error, and the half-done allocation is what a crash leaves, which the restart's
/// reconcile rolls back.
#[test]
fn an_allocation_whose_audit_row_fails_does_not_move() {
    if !common::privileged(&[]) {
        return;
    }
    let mut s = Server::start();
    s.init(&["0-7", "8-15"]);
    let trigger = |sql: &str| {
        rusqlite::Connection::open(s.db())
            .unwrap()
            .execute_batch(sql)
            .unwrap();
    };
    trigger(
        "CREATE TRIGGER refuse_audit BEFORE INSERT ON events WHEN NEW.operation = 'allocate' \
         BEGIN SELECT RAISE(ABORT, 'audit refused'); END;",
    );
    let key = ssh_key("audit");
    let (code, v) = s.call(
        "POST",
        "/api/compute_units/allocate",
        Some(&alloc_body(json!(8), &key, Value::Null)),
    );
    assert!(code >= 500, "{code} {v}");
    let (_, units) = s.get("/api/compute_units/?status=ALLOCATED");
    assert_eq!(units, json!([]), "a unit moved without its audit row");
    let (_, events) = s.get("/api/events?operation=allocate");
    assert_eq!(events, json!([]), "{events}");
    // The restart's reconcile rolls the claim back, as after a crash.
    trigger("DROP TRIGGER refuse_audit;");
    s.kill9();
    s.spawn();
    let (_, units) = s.get("/api/compute_units/");
    for u in units.as_array().unwrap() {
        assert_eq!(u["status"], "FREE", "{u}");
    }
    assert!(!s.root().join("home/u0-7/.ssh/authorized_keys").exists());
    let (code, _) = s.call(
        "POST",
        "/api/compute_units/allocate",
        Some(&alloc_body(json!(8), &key, Value::Null)),
    );
    assert_eq!(code, 200);
}
