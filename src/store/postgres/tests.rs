//! PgStore against the throw-away cluster of scripts/lib/pg.sh (`KLOIGOS_TEST_PG`). Without
//! it each test prints why it skips; `KLOIGOS_REQUIRE_PRIVILEGED=1` (scripts/test.sh) makes
//! that a failure.

use super::*;
use std::process::Command;
use std::sync::RwLock;
use std::time::Instant;

/// The outage test stops the cluster: it takes this for writing, every other test for reading.
static CLUSTER: RwLock<()> = RwLock::new(());

/// The cluster's base URL, or `None` (skip) when there is none.
fn cluster(test: &str) -> Option<String> {
    match std::env::var("KLOIGOS_TEST_PG") {
        Ok(base) => Some(base),
        Err(_) => {
            let why = format!("SKIP {test}: needs KLOIGOS_TEST_PG (scripts/lib/pg.sh)");
            assert!(
                std::env::var_os("KLOIGOS_REQUIRE_PRIVILEGED").is_none_or(|v| v != "1"),
                "{why} (KLOIGOS_REQUIRE_PRIVILEGED=1)"
            );
            eprintln!("{why}");
            None
        }
    }
}

fn psql(base: &str, sql: &str) {
    let out = Command::new("psql")
        .arg(format!("{base}/postgres?sslmode=disable"))
        .args(["-qAtX", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .expect("run psql");
    assert!(out.status.success(), "psql {sql}: {out:?}");
}

/// A new empty database; returns its name.
fn fresh_db(base: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let name = format!(
        "kloigos_u_{}_{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    psql(base, &format!("CREATE DATABASE {name}"));
    name
}

/// The URL of database `db` over TCP with TLS verified against the cluster's CA.
fn url(base: &str, db: &str) -> String {
    match std::env::var("KLOIGOS_TEST_PG_CA") {
        Ok(ca) => format!("{base}/{db}?sslmode=verify-full&sslrootcert={ca}"),
        Err(_) => format!("{base}/{db}"),
    }
}

fn server(hostname: &str, cpus: u32) -> (Server, Vec<NewUnit>) {
    let s = Server {
        hostname: hostname.into(),
        ip: "10.0.0.1".into(),
        region: "eu".into(),
        zone: "a".into(),
        status: ServerStatus::Initializing,
        cpu_ranges: vec![CpuList::from_cpus(0..cpus).expect("cpus")],
        port_base: 2000,
        ports_per_cpu: 10,
        uid_base: 20000,
        limits: Limits::default(),
        inventory_only: false,
        created_at: crate::time::now(),
        updated_at: crate::time::now(),
    };
    let units = (0..cpus / 2)
        .map(|i| NewUnit {
            compute_id: format!("{hostname}_{}-{}", 2 * i, 2 * i + 1),
            cpu_range: CpuList::from_cpus([2 * i, 2 * i + 1]).expect("cpus"),
            cpu_count: 2,
            first_cpu: 2 * i,
            uid: 20000 + 2 * i,
            user: format!("u{}-{}", 2 * i, 2 * i + 1),
            ports_range: PortRanges(vec![(2000 + 20 * i as u16, 2019 + 20 * i as u16)]),
        })
        .collect();
    (s, units)
}

/// A READY server with `cpus / 2` FREE units of 2 CPUs.
fn ready(s: &PgStore, hostname: &str, cpus: u32) {
    let (srv, units) = server(hostname, cpus);
    assert_eq!(s.begin_init(&srv, &units).unwrap(), Ok(()));
    s.set_server_status(hostname, ServerStatus::Ready, Some(UnitStatus::Free))
        .unwrap();
}

fn claim<'a>(local: &'a str, since: &'a str) -> Claim<'a> {
    Claim {
        cpu_count: 2,
        region: None,
        zone: None,
        tags: None,
        ssh_public_key: "ssh-ed25519 AAAA k",
        actor: "alice",
        inventory_only: false,
        local_hostname: local,
        reported_since: since,
        start_at: None,
    }
}

#[test]
fn urls_split_and_redact() {
    let t = split_url(
        "postgres://u:pw@db:5433/k?sslmode=verify-full&sslrootcert=/etc/ca.pem&connect_timeout=3",
    )
    .unwrap();
    assert_eq!(
        t,
        Target {
            url: "postgres://u:pw@db:5433/k?connect_timeout=3".into(),
            tls: Tls::VerifyFull,
            root_cert: Some("/etc/ca.pem".into()),
        }
    );
    assert_eq!(split_url("postgres://h/k").unwrap().tls, Tls::Prefer);
    assert_eq!(
        split_url("postgres://h/k?sslmode=disable").unwrap().url,
        "postgres://h/k"
    );
    assert!(matches!(
        split_url("postgres://h/k?sslmode=verify-ca"),
        Err(StoreError::Config(_))
    ));
    assert_eq!(
        redact("postgresql://kloigos:s3cret@10.0.0.1:5432/k?sslmode=require"),
        "postgresql://kloigos:***@10.0.0.1:5432/k?sslmode=require"
    );
    assert_eq!(redact("postgres://h/k"), "postgres://h/k");
    assert_eq!(
        DbTarget::Postgres("postgres://a:b@h/k".into()).to_string(),
        "postgres://a:***@h/k"
    );
    assert_eq!(
        DbTarget::parse("postgresql://h/k").unwrap().backend(),
        "postgresql"
    );
    assert_eq!(
        DbTarget::parse("/var/lib/kloigos/kloigos.db").unwrap(),
        DbTarget::Sqlite("/var/lib/kloigos/kloigos.db".into())
    );
    assert!(unavailable_code("57P01") && unavailable_code("08006"));
    assert!(!unavailable_code("23505"));
}

#[test]
fn migrations_are_idempotent_serialized_and_refuse_a_newer_database() {
    let Some(base) = cluster("migrations_are_idempotent_serialized_and_refuse_a_newer_database")
    else {
        return;
    };
    let _g = CLUSTER.read().unwrap_or_else(|p| p.into_inner());
    let db = fresh_db(&base);
    let u = url(&base, &db);
    // Four hubs starting together on an empty database: each migration applied once.
    let opened: Vec<Result<PgStore>> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..4).map(|_| sc.spawn(|| PgStore::open(&u))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(opened.iter().all(|r| r.is_ok()));
    let s = PgStore::open(&u).unwrap();
    let versions = s
        .rows(
            "SELECT version FROM kloigos_migrations ORDER BY version",
            &[],
            |r| Ok(r.try_get::<_, i64>(0)?),
        )
        .unwrap();
    assert_eq!(versions, (1..=MIGRATIONS.len() as i64).collect::<Vec<_>>());
    ready(&s, "h1", 4);
    drop(s);
    // Reopening keeps the data.
    let s = PgStore::open(&u).unwrap();
    assert_eq!(s.units(&UnitFilter::default()).unwrap().len(), 2);
    s.exec(
        "INSERT INTO kloigos_migrations (version, applied_at) VALUES (99, 'x')",
        &[],
    )
    .unwrap();
    drop(s);
    match PgStore::open(&u) {
        Err(e @ StoreError::SchemaTooNew { found: 99, .. }) => {
            assert!(e.to_string().contains("upgrade kloigos"), "{e}")
        }
        other => panic!("{:?}", other.err()),
    }
}

#[test]
fn tls_is_verified_and_unix_sockets_work() {
    let Some(base) = cluster("tls_is_verified_and_unix_sockets_work") else {
        return;
    };
    let _g = CLUSTER.read().unwrap_or_else(|p| p.into_inner());
    let db = fresh_db(&base);
    let s = PgStore::open(&url(&base, &db)).unwrap();
    let ssl = s
        .rows(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
            |r| Ok(r.try_get::<_, bool>(0)?),
        )
        .unwrap();
    if std::env::var_os("KLOIGOS_TEST_PG_CA").is_some() {
        assert_eq!(ssl, vec![true]);
        // A CA that did not sign the server's certificate: refused.
        let dir = tempfile::tempdir().unwrap();
        let other = dir.path().join("other.pem");
        let out = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args(["-subj", "/CN=other", "-keyout"])
            .arg(dir.path().join("k"))
            .arg("-out")
            .arg(&other)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let bad = format!(
            "{base}/{db}?sslmode=verify-full&sslrootcert={}",
            other.display()
        );
        match PgStore::open(&bad) {
            Err(StoreError::Unavailable(why)) => assert!(why.contains("certificate"), "{why}"),
            other => panic!("{:?}", other.err()),
        }
        // ... and a name the certificate does not have (it is for 127.0.0.1 and localhost).
        let ca = std::env::var("KLOIGOS_TEST_PG_CA").unwrap();
        let port = base.rsplit(':').next().unwrap();
        let user = base
            .trim_start_matches("postgresql://")
            .split('@')
            .next()
            .unwrap();
        let wrong = format!(
            "postgresql://{user}@db.example.invalid:{port}/{db}?hostaddr=127.0.0.1&\
             sslmode=verify-full&sslrootcert={ca}"
        );
        match PgStore::open(&wrong) {
            Err(StoreError::Unavailable(why)) => assert!(why.contains("certificate"), "{why}"),
            other => panic!("{:?}", other.err()),
        }
    }
    if let Ok(sock) = std::env::var("KLOIGOS_TEST_PG_SOCKET") {
        let port = base.rsplit(':').next().unwrap();
        let u = format!("postgresql://kloigos@/{db}?host={sock}&port={port}&sslmode=disable");
        let s = PgStore::open(&u).unwrap();
        assert!(s.servers().unwrap().is_empty());
    }
}

#[test]
fn concurrent_claims_take_each_unit_once_without_waiting() {
    let Some(base) = cluster("concurrent_claims_take_each_unit_once_without_waiting") else {
        return;
    };
    let _g = CLUSTER.read().unwrap_or_else(|p| p.into_inner());
    let db = fresh_db(&base);
    let s = PgStore::open(&url(&base, &db)).unwrap();
    ready(&s, "h1", 20); // 10 units
    // Connections first (scram-sha-256 and TLS are slow on purpose): the times below are the
    // claims' own.
    std::thread::scope(|sc| {
        for _ in 0..16 {
            sc.spawn(|| s.servers().unwrap());
        }
    });
    let t0 = Instant::now();
    let got: Vec<(String, Duration)> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..16)
            .map(|_| {
                sc.spawn(|| {
                    let mut mine = Vec::new();
                    for _ in 0..3 {
                        let t = Instant::now();
                        if let Some(u) = s.claim_free(&claim("h1", "1970")).unwrap() {
                            mine.push((u.compute_id, t.elapsed()));
                        }
                    }
                    mine
                })
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    let mut ids: Vec<&str> = got.iter().map(|(id, _)| id.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!((got.len(), ids.len()), (10, 10), "{got:?}");
    let slowest = got.iter().map(|(_, d)| *d).max().unwrap_or_default();
    eprintln!(
        "16 threads x 3 claims for 10 units: {} ms in all, slowest claim {} ms",
        t0.elapsed().as_millis(),
        slowest.as_millis()
    );
    let free = UnitFilter {
        status: Some("FREE".into()),
        ..Default::default()
    };
    assert!(s.units(&free).unwrap().is_empty());

    // A unit locked by a transaction that does not end (another hub mid-claim) is skipped at
    // once, not waited for: the next one is taken.
    for u in s.units(&UnitFilter::default()).unwrap() {
        s.transition(
            &u.compute_id,
            &[UnitStatus::Allocating],
            UnitStatus::Free,
            UnitChange::cleared(),
        )
        .unwrap();
    }
    let held = s
        .block(async {
            let c = s.pool.get().await.map_err(pool_error)?;
            c.batch_execute(
                "BEGIN; SELECT 1 FROM compute_units WHERE compute_id = 'h1_0-1' FOR UPDATE",
            )
            .await?;
            Ok(c)
        })
        .unwrap();
    let t = Instant::now();
    let u = s.claim_free(&claim("h1", "1970")).unwrap().unwrap();
    assert_eq!(u.compute_id, "h1_2-3");
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    // Closed, not returned to the pool with its transaction open.
    drop(deadpool_postgres::Object::take(held));
}

#[test]
fn eligibility_follows_hosts_like_sqlite() {
    let Some(base) = cluster("eligibility_follows_hosts_like_sqlite") else {
        return;
    };
    let _g = CLUSTER.read().unwrap_or_else(|p| p.into_inner());
    let db = fresh_db(&base);
    let s = PgStore::open(&url(&base, &db)).unwrap();
    for h in ["a-stale", "b-down", "c-fresh", "d-local"] {
        ready(&s, h, 2);
    }
    let since = crate::time::now();
    assert!(s.put_host("a-stale", "t1").unwrap());
    assert!(
        !s.put_host("a-stale", "t1b").unwrap(),
        "known host: new token"
    );
    assert_eq!(s.host_by_token("t1").unwrap(), None);
    assert_eq!(s.host_by_token("t1b").unwrap().as_deref(), Some("a-stale"));
    s.put_host("b-down", "t2").unwrap();
    s.put_host("c-fresh", "t3").unwrap();
    let facts = serde_json::json!({"cpus_online": "0-1"});
    for h in ["a-stale", "b-down", "c-fresh"] {
        s.host_joined(h, &facts, Some("http://x/api/host/poke"), "0.1.0")
            .unwrap();
    }
    // a-stale reported before `since`.
    s.host_reported("a-stale", &serde_json::json!({}), "0.1.0")
        .unwrap();
    s.exec(
        "UPDATE hosts SET last_report_at = '2000-01-01T00:00:00Z' WHERE hostname = 'a-stale'",
        &[],
    )
    .unwrap();
    let report = serde_json::json!({"facts": {"cpus_online": "0-3"}, "units": []});
    s.host_reported("b-down", &report, "0.1.1").unwrap();
    s.host_reported("c-fresh", &report, "0.1.1").unwrap();
    s.host_unreachable("b-down", Some("connection refused"))
        .unwrap();
    let b = s.host("b-down").unwrap().unwrap();
    assert_eq!(b.unreachable_reason.as_deref(), Some("connection refused"));
    assert_eq!(b.facts, Some(serde_json::json!({"cpus_online": "0-3"})));
    assert_eq!(b.version.as_deref(), Some("0.1.1"));
    // Fresh joined host first (by name), then the local one; never stale or unreachable.
    let c = claim("d-local", &since);
    assert_eq!(s.claim_free(&c).unwrap().unwrap().hostname, "c-fresh");
    assert_eq!(s.claim_free(&c).unwrap().unwrap().hostname, "d-local");
    assert!(s.claim_free(&c).unwrap().is_none());
    s.host_unreachable("b-down", None).unwrap();
    assert_eq!(s.claim_free(&c).unwrap().unwrap().hostname, "b-down");
    assert_eq!(
        s.hosts()
            .unwrap()
            .iter()
            .map(|h| h.hostname.as_str())
            .collect::<Vec<_>>(),
        ["a-stale", "b-down", "c-fresh"]
    );
    assert!(s.delete_host("a-stale").unwrap());
    assert!(!s.delete_host("a-stale").unwrap());
}

#[test]
fn transition_logged_commits_the_audit_row_with_the_move() {
    let Some(base) = cluster("transition_logged_commits_the_audit_row_with_the_move") else {
        return;
    };
    let _g = CLUSTER.read().unwrap_or_else(|p| p.into_inner());
    let db = fresh_db(&base);
    let s = PgStore::open(&url(&base, &db)).unwrap();
    ready(&s, "h1", 2);
    let u = s.claim_free(&claim("h1", "1970")).unwrap().unwrap();
    let ev = |actor: &'static str| NewEvent {
        actor,
        operation: "allocate",
        compute_id: Some("h1_0-1"),
        hostname: Some("h1"),
        result: Ok(()),
        before: None,
        after: Some(serde_json::json!({"status": "ALLOCATED"})),
    };
    // The moves' rows (the claim has its own).
    let count = || {
        s.events(&EventFilter {
            limit: 100,
            operation: Some("allocate".into()),
            ..Default::default()
        })
        .unwrap()
        .len()
    };
    // The audit row cannot be written (PostgreSQL refuses NUL in text): the move is undone.
    assert!(
        s.transition_logged(
            &u.compute_id,
            &[UnitStatus::Allocating],
            UnitStatus::Allocated,
            UnitChange::default(),
            ev("bad\0actor"),
        )
        .is_err()
    );
    assert_eq!(
        s.unit(&u.compute_id).unwrap().unwrap().status,
        UnitStatus::Allocating
    );
    assert_eq!(count(), 0);
    let Transition::Done(done) = s
        .transition_logged(
            &u.compute_id,
            &[UnitStatus::Allocating],
            UnitStatus::Allocated,
            UnitChange {
                started_at: Some(Some("2026-01-01T00:00:00Z".into())),
                ..Default::default()
            },
            ev("alice"),
        )
        .unwrap()
    else {
        panic!("not done")
    };
    assert_eq!(done.status, UnitStatus::Allocated);
    assert_eq!(done.started_at.as_deref(), Some("2026-01-01T00:00:00Z"));
    assert_eq!(done.claim, u.claim);
    assert_eq!(count(), 1);
    // Not done: no audit row.
    assert!(matches!(
        s.transition_logged(
            &u.compute_id,
            &[UnitStatus::Allocating],
            UnitStatus::Free,
            UnitChange::cleared(),
            ev("alice"),
        )
        .unwrap(),
        Transition::WrongState(UnitStatus::Allocated)
    ));
    assert!(matches!(
        s.transition(
            "nope",
            &[UnitStatus::Free],
            UnitStatus::Allocating,
            UnitChange::default()
        )
        .unwrap(),
        Transition::NotFound
    ));
    // A move the life cycle forbids, from an allowed status: an error, not a silent no-op.
    assert!(matches!(
        s.transition(
            &u.compute_id,
            &[UnitStatus::Allocated],
            UnitStatus::Free,
            UnitChange::default()
        ),
        Err(StoreError::Transition { .. })
    ));
    assert_eq!(count(), 1);
    let Transition::Done(freed) = s
        .transition(
            &u.compute_id,
            &[UnitStatus::Allocated],
            UnitStatus::Deallocating,
            UnitChange::default(),
        )
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(freed.tags, None);
    // Events: newest first, filters, pruning.
    s.record(ev("bob")).unwrap();
    let bob = s
        .events(&EventFilter {
            actor: Some("bob".into()),
            limit: 10,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(bob.len(), 1);
    // Kept: bob's; gone: the claim's row and alice's.
    assert_eq!(s.prune_events(None, Some(1)).unwrap(), 2);
    assert_eq!(count(), 1);
}

#[test]
fn unavailable_while_the_server_is_down_then_recovers() {
    let Some(base) = cluster("unavailable_while_the_server_is_down_then_recovers") else {
        return;
    };
    let Ok(ctl) = std::env::var("KLOIGOS_TEST_PG_CTL") else {
        let why =
            "SKIP unavailable_while_the_server_is_down_then_recovers: needs KLOIGOS_TEST_PG_CTL";
        assert!(
            std::env::var_os("KLOIGOS_REQUIRE_PRIVILEGED").is_none_or(|v| v != "1"),
            "{why}"
        );
        eprintln!("{why}");
        return;
    };
    let _g = CLUSTER.write().unwrap_or_else(|p| p.into_inner());
    let pg_ctl = |action: &str| {
        let mut words = ctl.split_whitespace();
        let out = Command::new(words.next().unwrap())
            .args(words)
            .arg(action)
            .args(["-m", "fast"].iter().filter(|_| action == "stop"))
            .output()
            .unwrap();
        assert!(out.status.success(), "pg_ctl {action}: {out:?}");
    };
    let db = fresh_db(&base);
    let s = PgStore::open(&url(&base, &db)).unwrap();
    ready(&s, "h1", 2);
    pg_ctl("stop");
    let down = s.servers();
    let again = s.unit("h1_0-1");
    pg_ctl("start");
    match down {
        Err(StoreError::Unavailable(_)) => {}
        other => panic!("{other:?}"),
    }
    match again {
        Err(StoreError::Unavailable(_)) => {}
        other => panic!("{other:?}"),
    }
    // The pool reconnects by itself.
    let t = Instant::now();
    loop {
        match s.servers() {
            Ok(v) => {
                assert_eq!(v.len(), 1);
                break;
            }
            Err(e) => assert!(t.elapsed() < Duration::from_secs(10), "{e}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // A new store while the server is down fails at once with a clear reason.
    pg_ctl("stop");
    let t = Instant::now();
    let r = PgStore::open(&url(&base, &db));
    pg_ctl("start");
    match r {
        Err(StoreError::Unavailable(why)) => assert!(why.contains("connect"), "{why}"),
        other => panic!("{:?}", other.err()),
    }
    assert!(t.elapsed() < Duration::from_secs(8));
}

#[test]
fn callable_from_blocking_threads_and_async_workers() {
    let Some(base) = cluster("callable_from_blocking_threads_and_async_workers") else {
        return;
    };
    let _g = CLUSTER.read().unwrap_or_else(|p| p.into_inner());
    let db = fresh_db(&base);
    let s = Arc::new(PgStore::open(&url(&base, &db)).unwrap());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (a, b) = rt.block_on(async {
        let s1 = s.clone();
        // As the API calls it ...
        let a = tokio::task::spawn_blocking(move || s1.servers().map(|v| v.len()))
            .await
            .unwrap();
        // ... and straight from a task, which must not panic.
        let s2 = s.clone();
        let b = tokio::spawn(async move { s2.servers().map(|v| v.len()) })
            .await
            .unwrap();
        (a, b)
    });
    assert_eq!((a.unwrap(), b.unwrap()), (0, 0));
    // The store dropped inside the runtime: no panic either.
    rt.block_on(async move { drop(s) });
}

#[test]
fn claims_pick_the_same_units_as_sqlite() {
    let Some(base) = cluster("claims_pick_the_same_units_as_sqlite") else {
        return;
    };
    let _g = CLUSTER.read().unwrap_or_else(|p| p.into_inner());
    let db = fresh_db(&base);
    let pg = PgStore::open(&url(&base, &db)).unwrap();
    let lite = crate::store::Store::open_in_memory().unwrap();
    let stores: [&dyn Inventory; 2] = [&pg, &lite];
    // The same inventory in both: servers in two regions and zones, one inventory-only, one
    // not READY, a unit with a problem, mixed unit sizes.
    for s in stores {
        for (h, region, zone, only, cpus) in [
            ("local", "eu", "a", false, 8),
            ("b-other", "eu", "b", false, 4),
            ("c-inv", "us", "a", true, 4),
            ("a-init", "eu", "a", false, 4),
        ] {
            let (mut srv, mut units) = server(h, cpus);
            srv.region = region.into();
            srv.zone = zone.into();
            srv.inventory_only = only;
            if h == "local" {
                // one 4-CPU unit too
                units.truncate(2);
                units.push(NewUnit {
                    compute_id: "local_4-7".into(),
                    cpu_range: CpuList::from_cpus(4..8).unwrap(),
                    cpu_count: 4,
                    first_cpu: 4,
                    uid: 20004,
                    user: "u4-7".into(),
                    ports_range: PortRanges(vec![(2080, 2159)]),
                });
            }
            s.begin_init(&srv, &units).unwrap().unwrap();
            if h != "a-init" {
                s.set_server_status(h, ServerStatus::Ready, Some(UnitStatus::Free))
                    .unwrap();
            }
        }
        s.set_problem("local_0-1", Some("wrecked")).unwrap();
    }
    let asks: Vec<(u32, Option<&str>, Option<&str>, bool)> = vec![
        (2, None, None, false),
        (2, Some("eu"), Some("a"), false),
        (4, None, None, false),
        (2, Some("us"), None, true),
        (2, None, None, true),
        (2, None, None, true),
        (2, None, None, false),
        (4, None, None, false),
    ];
    let picks: Vec<Vec<Option<String>>> = stores
        .iter()
        .map(|s| {
            asks.iter()
                .map(|&(cpu_count, region, zone, inventory_only)| {
                    s.claim_free(&Claim {
                        cpu_count,
                        region,
                        zone,
                        inventory_only,
                        ..claim("local", "1970")
                    })
                    .unwrap()
                    .map(|u| u.compute_id)
                })
                .collect()
        })
        .collect();
    assert_eq!(picks[0], picks[1]);
    // ... and what they picked is what the rule says: b-other is neither this host nor a
    // joined one, a-init is not READY, local_0-1 has a problem, c-inv only on request.
    let want = [
        Some("local_2-3"),
        None,
        Some("local_4-7"),
        Some("c-inv_0-1"),
        Some("c-inv_2-3"),
        None,
        None,
        None,
    ];
    assert_eq!(
        picks[0].iter().map(Option::as_deref).collect::<Vec<_>>(),
        want
    );
}

#[test]
fn claims_start_where_asked_and_wrap_around_like_sqlite() {
    let Some(base) = cluster("claims_start_where_asked_and_wrap_around_like_sqlite") else {
        return;
    };
    let _g = CLUSTER.read().unwrap_or_else(|p| p.into_inner());
    let db = fresh_db(&base);
    let pg = PgStore::open(&url(&base, &db)).unwrap();
    let lite = crate::store::Store::open_in_memory().unwrap();
    let stores: [&dyn Inventory; 2] = [&pg, &lite];
    for s in stores {
        for h in ["a", "b", "c"] {
            let (mut srv, units) = server(h, 4);
            srv.inventory_only = true;
            s.begin_init(&srv, &units).unwrap().unwrap();
            s.set_server_status(h, ServerStatus::Ready, Some(UnitStatus::Free))
                .unwrap();
        }
    }
    // From the start on in hostname and CPU order; past the last hostname, from the first;
    // `None`, from the first.
    let starts = [
        Some("b"),
        Some("b"),
        Some("b"),
        Some("zzz"),
        Some("a"),
        None,
        Some("b"),
    ];
    let want = [
        Some("b_0-1"),
        Some("b_2-3"),
        Some("c_0-1"),
        Some("a_0-1"),
        Some("a_2-3"),
        Some("c_2-3"),
        None,
    ];
    for s in stores {
        let picks: Vec<Option<String>> = starts
            .iter()
            .map(|&start_at| {
                s.claim_free(&Claim {
                    inventory_only: true,
                    start_at,
                    ..claim("local", "1970")
                })
                .unwrap()
                .map(|u| u.compute_id)
            })
            .collect();
        assert_eq!(picks.iter().map(Option::as_deref).collect::<Vec<_>>(), want);
    }
}
