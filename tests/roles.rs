//! Access control, every role against every endpoint: bearer tokens over TCP (admin, user,
//! readonly, none, invalid), peer credentials on the unix socket (root, an unprivileged user, a
//! unit's own user).

mod common;

use common::{HOST, Server, ssh_key};
use serde_json::{Value, json};
use std::process::Command;

fn alloc(owner: &str) -> String {
    json!({"cpu_count": 2, "tags": {"owner": owner}, "ssh_public_key": ssh_key(owner)}).to_string()
}

/// A request on the unix socket from another uid: curl, with root dropped for the client only
/// (setpriv), so the service sees that uid in the socket's peer credentials.
fn unix_as(s: &Server, uid: u32, method: &str, path: &str, body: &str) -> u16 {
    let mut cmd = Command::new("setpriv");
    cmd.args([
        &format!("--reuid={uid}"),
        &format!("--regid={uid}"),
        "--clear-groups",
        "curl",
        "--silent",
        "--show-error",
        "--output",
        "/dev/null",
        "--write-out",
        "%{http_code}",
        "--unix-socket",
    ])
    .arg(&s.socket)
    .args(["--request", method]);
    if !body.is_empty() {
        cmd.args([
            "--header",
            "Content-Type: application/json",
            "--data-binary",
            body,
        ]);
    }
    let out = cmd
        .arg(format!("http://localhost{path}"))
        .output()
        .expect("setpriv curl");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("status code")
}

#[test]
fn every_role_against_every_endpoint() {
    // It switches uids for the unix socket's clients.
    if !common::privileged(&["setpriv", "curl"]) {
        return;
    }
    let s = Server::start_tcp();
    // Let other uids reach the socket (it is 0666 itself).
    std::fs::set_permissions(
        s.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let admin = s.token("ops", "admin");
    let user = s.token("alice", "user");
    let user2 = s.token("bob", "user");
    let ro = s.token("monitor", "readonly");
    s.init(&["0-1", "2-3", "4-5", "6-7", "8-9", "10-11", "12-13", "14-15"]);
    let t = |tok: Option<&str>, m: &str, p: &str, b: Option<&str>| s.tcp_call(tok, m, p, b);

    // Public without a token: dashboard, docs, OpenAPI, health.
    for p in ["/", "/docs/", "/openapi.json", "/healthz", "/assets/app.js"] {
        assert_eq!(t(None, "GET", p, None).0, 200, "{p}");
    }
    // /api needs a token over TCP; an invalid one is refused.
    for p in [
        "/api/compute_units/",
        "/api/admin/servers",
        "/api/events",
        "/api/whoami",
        "/api/compute_units/testhost_0-1",
    ] {
        assert_eq!(t(None, "GET", p, None).0, 401, "{p}");
        assert_eq!(t(Some("klg_forged"), "GET", p, None).0, 401, "{p}");
        for tok in [&admin, &user, &ro] {
            assert_eq!(t(Some(tok), "GET", p, None).0, 200, "{p}");
        }
        assert_eq!(
            unix_as(&s, 65534, "GET", p, ""),
            200,
            "unix nobody reads {p}"
        );
    }
    for (tok, role) in [(&admin, "admin"), (&user, "user"), (&ro, "readonly")] {
        assert_eq!(t(Some(tok), "GET", "/api/whoami", None).1["role"], role);
    }
    assert_eq!(
        s.get("/api/whoami").1["role"],
        "admin",
        "root on the unix socket"
    );

    // init_server: admin only.
    let remote = json!({"ip": "192.0.2.99", "region": "eu", "zone": "b", "hostname": "remote1", "cpu_ranges": ["0-1"], "inventory_only": true}).to_string();
    for tok in [None, Some("klg_forged")] {
        assert_eq!(
            t(tok, "POST", "/api/admin/init_server", Some(&remote)).0,
            401
        );
    }
    for tok in [&user, &ro] {
        assert_eq!(
            t(Some(tok), "POST", "/api/admin/init_server", Some(&remote)).0,
            403
        );
    }
    assert_eq!(
        unix_as(&s, 65534, "POST", "/api/admin/init_server", &remote),
        403
    );
    assert_eq!(
        unix_as(&s, 20000, "POST", "/api/admin/init_server", &remote),
        403,
        "a unit's own user"
    );
    assert_eq!(
        t(
            Some(&admin),
            "POST",
            "/api/admin/init_server",
            Some(&remote)
        )
        .0,
        200
    );

    // allocate: user and admin.
    assert_eq!(
        t(
            Some(&ro),
            "POST",
            "/api/compute_units/allocate",
            Some(&alloc("ro"))
        )
        .0,
        403
    );
    assert_eq!(
        t(
            None,
            "POST",
            "/api/compute_units/allocate",
            Some(&alloc("anon"))
        )
        .0,
        401
    );
    assert_eq!(
        unix_as(
            &s,
            65534,
            "POST",
            "/api/compute_units/allocate",
            &alloc("nobody")
        ),
        403
    );
    assert_eq!(
        unix_as(
            &s,
            20000,
            "POST",
            "/api/compute_units/allocate",
            &alloc("unit")
        ),
        403
    );
    let id = |r: (u16, Value)| {
        assert_eq!(r.0, 200, "{}", r.1);
        r.1["compute_id"].as_str().unwrap().to_string()
    };
    let a = id(t(
        Some(&user),
        "POST",
        "/api/compute_units/allocate",
        Some(&alloc("alice")),
    ));
    let b = id(t(
        Some(&user2),
        "POST",
        "/api/compute_units/allocate",
        Some(&alloc("bob")),
    ));
    let c = id(t(
        Some(&admin),
        "POST",
        "/api/compute_units/allocate",
        Some(&alloc("ops")),
    ));
    let d = id(s.call("POST", "/api/compute_units/allocate", Some(&alloc("root"))));
    let owner = |unit: &str| s.get(&format!("/api/compute_units/{unit}")).1["allocated_by"].clone();
    assert_eq!(
        (owner(&a), owner(&c)),
        (json!("token:alice"), json!("token:ops"))
    );
    assert!(
        owner(&d).as_str().unwrap().starts_with("unix:"),
        "{}",
        owner(&d)
    );

    // deallocate: a user only its own; admin anything; readonly and other local users nothing.
    let dealloc = |tok: Option<&str>, unit: &str| {
        t(
            tok,
            "DELETE",
            &format!("/api/compute_units/deallocate/{unit}"),
            None,
        )
        .0
    };
    assert_eq!(
        dealloc(Some(&user), &b),
        403,
        "alice cannot free bob's unit"
    );
    assert_eq!(dealloc(Some(&user), &c), 403);
    assert_eq!(dealloc(Some(&ro), &a), 403);
    assert_eq!(dealloc(None, &a), 401);
    assert_eq!(
        unix_as(
            &s,
            65534,
            "DELETE",
            &format!("/api/compute_units/deallocate/{d}"),
            ""
        ),
        403
    );
    assert_eq!(
        unix_as(
            &s,
            20000,
            "DELETE",
            &format!("/api/compute_units/deallocate/{d}"),
            ""
        ),
        403
    );
    assert_eq!(dealloc(Some(&user), &a), 200, "alice frees her own");
    assert_eq!(dealloc(Some(&admin), &b), 200, "admin frees bob's");
    assert_eq!(
        s.call(
            "DELETE",
            &format!("/api/compute_units/deallocate/{c}"),
            None
        )
        .0,
        200,
        "root frees the admin token's"
    );
    let (_, u) = s.get(&format!("/api/compute_units/{d}"));
    assert_eq!(u["status"], "ALLOCATED", "denied requests changed nothing");

    // decommission: admin only.
    for tok in [&user, &ro] {
        assert_eq!(
            t(
                Some(tok),
                "DELETE",
                "/api/admin/decommission_server/remote1",
                None
            )
            .0,
            403
        );
    }
    assert_eq!(
        unix_as(
            &s,
            65534,
            "DELETE",
            "/api/admin/decommission_server/remote1",
            ""
        ),
        403
    );
    assert_eq!(
        t(
            Some(&admin),
            "DELETE",
            "/api/admin/decommission_server/remote1",
            None
        )
        .0,
        200
    );

    // Who did what is in the audit log: owners by token name, denials, a forged token.
    let (_, ev) = t(
        Some(&ro),
        "GET",
        &format!("/api/events?compute_id={a}"),
        None,
    );
    assert_eq!(ev[0]["actor"], "token:alice", "{ev}");
    let (_, denied) = s.get("/api/events?operation=deallocate&limit=100");
    assert!(
        denied
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["actor"] == "token:alice"
                && e["detail"].as_str().unwrap_or("").starts_with("denied:")),
        "{denied}"
    );
    let (_, auth) = s.get("/api/events?operation=authenticate");
    assert!(
        !auth.as_array().unwrap().is_empty(),
        "a forged token is audited"
    );
    assert!(
        auth[0]["actor"]
            .as_str()
            .unwrap()
            .starts_with("tcp 127.0.0.1:"),
        "{auth}"
    );

    // Revoking a token takes effect at once; list shows names and roles, never secrets.
    let out = Command::new(common::bin())
        .args(["token", "--tokens"])
        .arg(s.tokens())
        .args(["revoke", "alice"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(t(Some(&user), "GET", "/api/whoami", None).0, 401);
    let out = Command::new(common::bin())
        .args(["token", "--tokens"])
        .arg(s.tokens())
        .arg("list")
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        listing.contains("bob") && listing.contains("monitor") && !listing.contains("alice"),
        "{listing}"
    );
    assert!(!listing.contains(&user2) && !listing.contains(&admin));
    let _ = HOST;
}
