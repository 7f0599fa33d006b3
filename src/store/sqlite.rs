//! The SQLite inventory, the default [`Inventory`].
//!
//! One connection behind a mutex per process; every change is one `BEGIN IMMEDIATE`
//! transaction, so concurrent writers (threads or processes) are serialized by SQLite and a
//! unit is claimed by exactly one allocation. WAL mode keeps readers off the writer's back.

use super::*;
use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};
use rusqlite_migration::{M, Migrations};
use std::fmt;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

fn migrations() -> Migrations<'static> {
    Migrations::new(vec![
        M::up(
            r#"
        CREATE TABLE servers (
            hostname      TEXT PRIMARY KEY NOT NULL,
            ip            TEXT NOT NULL,
            region        TEXT NOT NULL,
            zone          TEXT NOT NULL,
            status        TEXT NOT NULL,
            cpu_ranges    TEXT NOT NULL,   -- JSON array of canonical CPU lists
            port_base     INTEGER NOT NULL,
            ports_per_cpu INTEGER NOT NULL,
            uid_base      INTEGER NOT NULL,
            limits        TEXT NOT NULL,   -- JSON object (Limits)
            created_at    TEXT NOT NULL,
            updated_at    TEXT NOT NULL
        ) STRICT;
        CREATE TABLE compute_units (
            compute_id     TEXT PRIMARY KEY NOT NULL,
            hostname       TEXT NOT NULL REFERENCES servers(hostname) ON DELETE CASCADE,
            cpu_range      TEXT NOT NULL,
            cpu_count      INTEGER NOT NULL,
            first_cpu      INTEGER NOT NULL,
            uid            INTEGER NOT NULL,
            user           TEXT NOT NULL,
            ports_range    TEXT NOT NULL,
            status         TEXT NOT NULL,
            started_at     TEXT,
            tags           TEXT,           -- JSON object or NULL
            ssh_public_key TEXT,
            allocated_by   TEXT,
            updated_at     TEXT NOT NULL,
            UNIQUE (hostname, uid),
            UNIQUE (hostname, user)
        ) STRICT;
        CREATE INDEX compute_units_pick ON compute_units (status, cpu_count, hostname, first_cpu);
        CREATE TABLE events (
            id          INTEGER PRIMARY KEY AUTOINCREMENT,
            time        TEXT NOT NULL,
            actor       TEXT NOT NULL,
            operation   TEXT NOT NULL,
            compute_id  TEXT,
            hostname    TEXT,
            result      TEXT NOT NULL,
            detail      TEXT,
            before      TEXT,
            after       TEXT
        ) STRICT;
        CREATE INDEX events_compute_id ON events (compute_id, id);
        CREATE INDEX events_hostname ON events (hostname, id);
        "#,
        ),
        // Why reconcile could not repair a unit on its host (NULL: nothing wrong).
        M::up("ALTER TABLE compute_units ADD COLUMN problem TEXT;"),
        M::up(
            r#"
        ALTER TABLE compute_units ADD COLUMN claim TEXT;
        ALTER TABLE servers ADD COLUMN inventory_only INTEGER NOT NULL DEFAULT 0;
        CREATE TABLE hosts (
            hostname           TEXT PRIMARY KEY NOT NULL,
            token_sha256       TEXT NOT NULL UNIQUE,
            facts              TEXT,
            poke_url           TEXT,
            version            TEXT,
            joined_at          TEXT,
            last_report_at     TEXT,
            last_report        TEXT,
            unreachable_since  TEXT,
            unreachable_reason TEXT,
            created_at         TEXT NOT NULL
        );
        "#,
        ),
        // Lists in their order without a sort; what reconcile looks at, without a scan; and a
        // change counter that every process's change moves (for the list cache and ETags).
        M::up(
            r#"
        CREATE INDEX compute_units_host ON compute_units (hostname, first_cpu);
        CREATE INDEX compute_units_unsettled ON compute_units (hostname, first_cpu)
            WHERE status IN ('ALLOCATING', 'ALLOCATION_FAIL', 'DEALLOCATING', 'DEALLOCATION_FAIL')
               OR problem IS NOT NULL;
        CREATE TABLE kloigos_generation (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            n  INTEGER NOT NULL
        ) STRICT;
        INSERT INTO kloigos_generation (id, n) VALUES (1, 0);
        CREATE TRIGGER units_inserted AFTER INSERT ON compute_units
            BEGIN UPDATE kloigos_generation SET n = n + 1; END;
        CREATE TRIGGER units_updated AFTER UPDATE ON compute_units
            BEGIN UPDATE kloigos_generation SET n = n + 1; END;
        CREATE TRIGGER units_deleted AFTER DELETE ON compute_units
            BEGIN UPDATE kloigos_generation SET n = n + 1; END;
        CREATE TRIGGER servers_inserted AFTER INSERT ON servers
            BEGIN UPDATE kloigos_generation SET n = n + 1; END;
        CREATE TRIGGER servers_updated AFTER UPDATE ON servers
            BEGIN UPDATE kloigos_generation SET n = n + 1; END;
        CREATE TRIGGER servers_deleted AFTER DELETE ON servers
            BEGIN UPDATE kloigos_generation SET n = n + 1; END;
        "#,
        ),
        // Start-up reads servers by status, and the fleet's (not inventory-only) ones,
        // without a scan of a large inventory.
        M::up(
            r#"
        CREATE INDEX servers_status ON servers (status, hostname);
        CREATE INDEX servers_fleet ON servers (hostname) WHERE inventory_only = 0;
        "#,
        ),
    ])
}

/// Read connections kept for reuse (WAL lets them read while the writer writes).
const READERS_KEPT: usize = 4;

pub(crate) struct Store {
    conn: Mutex<Connection>,
    /// The database file, for read connections (`None`: in memory, reads use `conn`).
    path: Option<std::path::PathBuf>,
    readers: Mutex<Vec<Connection>>,
}

/// The units a half-done operation or a problem left (the partial index's condition).
const UNSETTLED: &str = "(u.status IN ('ALLOCATING', 'ALLOCATION_FAIL', 'DEALLOCATING', \
    'DEALLOCATION_FAIL') OR u.problem IS NOT NULL)";

/// The list's columns, in `UnitRow` order.
const LIST_SELECT: &str = "SELECT u.compute_id, u.hostname, s.ip, s.region, s.zone, u.cpu_range, \
    u.cpu_count, u.uid, u.user, u.ports_range, u.status, u.started_at, u.tags, u.allocated_by, \
    u.problem FROM compute_units u JOIN servers s ON s.hostname = u.hostname";

const UNIT_SELECT: &str = "SELECT u.compute_id, u.hostname, s.ip, s.region, s.zone, u.cpu_range, \
    u.cpu_count, u.first_cpu, u.uid, u.user, u.ports_range, u.status, u.started_at, u.tags, \
    u.ssh_public_key, u.allocated_by, u.updated_at, u.problem, u.claim \
    FROM compute_units u JOIN servers s ON s.hostname = u.hostname";

const SERVER_SELECT: &str = "SELECT hostname, ip, region, zone, status, cpu_ranges, port_base, \
    ports_per_cpu, uid_base, limits, created_at, updated_at, inventory_only FROM servers";

fn corrupt(what: impl fmt::Display) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        0,
        rusqlite::types::Type::Text,
        Box::new(StoreError::Corrupt(what.to_string())),
    )
}

fn json_col(row: &Row, idx: usize) -> rusqlite::Result<Option<Value>> {
    let text: Option<String> = row.get(idx)?;
    text.map(|t| serde_json::from_str(&t).map_err(corrupt))
        .transpose()
}

fn unit_from_row(row: &Row) -> rusqlite::Result<Unit> {
    let status: String = row.get(11)?;
    Ok(Unit {
        compute_id: row.get(0)?,
        hostname: row.get(1)?,
        ip: row.get(2)?,
        region: row.get(3)?,
        zone: row.get(4)?,
        cpu_range: row.get::<_, String>(5)?.parse().map_err(corrupt)?,
        cpu_count: row.get(6)?,
        first_cpu: row.get(7)?,
        uid: row.get(8)?,
        user: row.get(9)?,
        ports_range: row.get::<_, String>(10)?.parse().map_err(corrupt)?,
        status: status.parse().map_err(corrupt)?,
        started_at: row.get(12)?,
        tags: json_col(row, 13)?,
        ssh_public_key: row.get(14)?,
        allocated_by: row.get(15)?,
        updated_at: row.get(16)?,
        problem: row.get(17)?,
        claim: row.get(18)?,
    })
}

fn server_from_row(row: &Row) -> rusqlite::Result<Server> {
    let status: String = row.get(4)?;
    let ranges: String = row.get(5)?;
    let limits: String = row.get(9)?;
    Ok(Server {
        hostname: row.get(0)?,
        ip: row.get(1)?,
        region: row.get(2)?,
        zone: row.get(3)?,
        status: status.parse().map_err(corrupt)?,
        cpu_ranges: serde_json::from_str(&ranges).map_err(corrupt)?,
        port_base: row.get(6)?,
        ports_per_cpu: row.get(7)?,
        uid_base: row.get(8)?,
        limits: serde_json::from_str(&limits).map_err(corrupt)?,
        created_at: row.get(10)?,
        inventory_only: row.get(12)?,
        updated_at: row.get(11)?,
    })
}

fn event_from_row(row: &Row) -> rusqlite::Result<Event> {
    Ok(Event {
        id: row.get(0)?,
        time: row.get(1)?,
        actor: row.get(2)?,
        operation: row.get(3)?,
        compute_id: row.get(4)?,
        hostname: row.get(5)?,
        result: row.get(6)?,
        detail: row.get(7)?,
        before: json_col(row, 8)?,
        after: json_col(row, 9)?,
    })
}

/// The compare-and-set of [`Inventory::transition`] inside the caller's transaction (which
/// commits it).
fn transition_in(
    tx: &rusqlite::Transaction<'_>,
    compute_id: &str,
    from: &[UnitStatus],
    to: UnitStatus,
    change: UnitChange,
) -> Result<Transition> {
    let current: Option<String> = tx
        .query_row(
            "SELECT status FROM compute_units WHERE compute_id = ?1",
            [compute_id],
            |r| r.get(0),
        )
        .optional()?;
    let Some(current) = current else {
        return Ok(Transition::NotFound);
    };
    let current: UnitStatus = current.parse().map_err(StoreError::Corrupt)?;
    if !from.contains(&current) {
        return Ok(Transition::WrongState(current));
    }
    if !current.can_become(to) {
        return Err(StoreError::Transition {
            compute_id: compute_id.to_string(),
            from: current,
            to,
        });
    }
    tx.execute(
        "UPDATE compute_units SET status = ?2, updated_at = ?3 WHERE compute_id = ?1",
        params![compute_id, to.as_str(), crate::time::now()],
    )?;
    if let Some(v) = change.started_at {
        tx.execute(
            "UPDATE compute_units SET started_at = ?2 WHERE compute_id = ?1",
            params![compute_id, v],
        )?;
    }
    if let Some(v) = change.tags {
        let v = v
            .map(|t| serde_json::to_string(&t).map_err(corrupt))
            .transpose()?;
        tx.execute(
            "UPDATE compute_units SET tags = ?2 WHERE compute_id = ?1",
            params![compute_id, v],
        )?;
    }
    if let Some(v) = change.ssh_public_key {
        tx.execute(
            "UPDATE compute_units SET ssh_public_key = ?2 WHERE compute_id = ?1",
            params![compute_id, v],
        )?;
    }
    if let Some(v) = change.allocated_by {
        tx.execute(
            "UPDATE compute_units SET allocated_by = ?2 WHERE compute_id = ?1",
            params![compute_id, v],
        )?;
    }
    if let Some(v) = change.claim {
        tx.execute(
            "UPDATE compute_units SET claim = ?2 WHERE compute_id = ?1",
            params![compute_id, v],
        )?;
    }
    if let Some(v) = change.problem {
        tx.execute(
            "UPDATE compute_units SET problem = ?2 WHERE compute_id = ?1",
            params![compute_id, v],
        )?;
    }
    let unit = tx.query_row(
        &format!("{UNIT_SELECT} WHERE u.compute_id = ?1"),
        [compute_id],
        unit_from_row,
    )?;
    Ok(Transition::Done(Box::new(unit)))
}

/// Appends an audit record on `conn` (a connection or a transaction); returns its id.
fn insert_event(conn: &Connection, e: NewEvent<'_>) -> Result<i64> {
    let (result, detail) = match e.result {
        Ok(()) => ("ok", None),
        Err(d) => ("error", Some(d)),
    };
    let js = |v: Option<Value>| v.map(|v| v.to_string());
    // Whatever a caller can put in a row (a path, a host name) is clipped: a refused
    // request must not cost more than a few hundred bytes of disk.
    use crate::audit::{MAX_NAME, MAX_TEXT, clip};
    let name = |v: Option<&str>| v.map(|v| clip(v, MAX_NAME).into_owned());
    conn.execute(
        "INSERT INTO events (time, actor, operation, compute_id, hostname, result, detail, before, after) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![
            crate::time::now(),
            clip(e.actor, MAX_NAME),
            clip(e.operation, MAX_NAME),
            name(e.compute_id),
            name(e.hostname),
            result,
            detail.map(|d| clip(d, MAX_TEXT)),
            js(e.before),
            js(e.after)
        ],
    )?;
    Ok(conn.last_insert_rowid())
}

const HOST_SELECT: &str = "SELECT hostname, token_sha256, facts, poke_url, version, joined_at, \
    last_report_at, last_report, unreachable_since, unreachable_reason, created_at FROM hosts";

fn host_from_row(row: &Row) -> rusqlite::Result<HostRecord> {
    Ok(HostRecord {
        hostname: row.get(0)?,
        token_sha256: row.get(1)?,
        facts: json_col(row, 2)?,
        poke_url: row.get(3)?,
        version: row.get(4)?,
        joined_at: row.get(5)?,
        last_report_at: row.get(6)?,
        last_report: json_col(row, 7)?,
        unreachable_since: row.get(8)?,
        unreachable_reason: row.get(9)?,
        created_at: row.get(10)?,
    })
}

fn json_text(v: &Value) -> rusqlite::Result<String> {
    serde_json::to_string(v).map_err(corrupt)
}

/// `select` (joining `compute_units u` and `servers s`) filtered by `f`, in list order.
fn unit_query(select: &str, f: &UnitFilter) -> (String, Vec<rusqlite::types::Value>) {
    let mut sql = format!("{select} WHERE 1=1");
    let mut args: Vec<rusqlite::types::Value> = Vec::new();
    let mut add = |cond: &str, v: rusqlite::types::Value| {
        args.push(v);
        sql.push_str(&format!(" AND {cond} ?{}", args.len()));
    };
    use rusqlite::types::Value as V;
    if let Some(v) = &f.compute_id {
        add("u.compute_id =", V::Text(v.clone()));
    }
    if let Some(v) = &f.hostname {
        add("u.hostname =", V::Text(v.clone()));
    }
    if let Some(v) = &f.region {
        add("s.region =", V::Text(v.clone()));
    }
    if let Some(v) = &f.zone {
        add("s.zone =", V::Text(v.clone()));
    }
    if let Some(v) = f.cpu_count {
        add("u.cpu_count =", V::Integer(v));
    }
    if let Some(v) = &f.status {
        add("u.status =", V::Text(v.clone()));
    }
    if let Some(v) = &f.deployment_id {
        // Tag values may be strings or integers: compare as text either way.
        add(
            "CAST(json_extract(u.tags, '$.deployment_id') AS TEXT) =",
            V::Text(v.clone()),
        );
    }
    sql.push_str(" ORDER BY u.hostname, u.first_cpu");
    (sql, args)
}

impl Store {
    /// Opens (creating if needed) the database at `path` and brings its schema up to date.
    pub(crate) fn open(path: &Path) -> Result<Store> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Directory {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // FULL: a commit is on disk before the caller hears of it. Under NORMAL a power loss
        // could undo an allocation already answered ALLOCATED (its key file surviving it), or
        // a deallocation already answered: one WAL fsync per commit is what that costs.
        conn.pragma_update(None, "synchronous", "FULL")?;
        Self::init(conn, Some(path.to_path_buf()))
    }

    #[cfg(test)]
    pub(crate) fn open_in_memory() -> Result<Store> {
        Self::init(Connection::open_in_memory()?, None)
    }

    fn init(mut conn: Connection, path: Option<std::path::PathBuf>) -> Result<Store> {
        conn.busy_timeout(std::time::Duration::from_secs(30))?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        migrations().to_latest(&mut conn)?;
        Ok(Store {
            conn: Mutex::new(conn),
            path,
            readers: Mutex::new(Vec::new()),
        })
    }

    /// Runs `f` on a read connection of the pool (opened when none is free), so that readers
    /// neither wait for the writer nor for each other; in memory, on the one connection.
    fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let Some(path) = &self.path else {
            return f(&self.conn());
        };
        let kept = self.readers.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let conn = match kept {
            Some(c) => c,
            None => {
                let c = Connection::open_with_flags(
                    path,
                    rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
                        | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )?;
                c.busy_timeout(std::time::Duration::from_secs(30))?;
                c.set_prepared_statement_cache_capacity(64);
                // Lists read their rows once, in order: a small page cache does (the
                // kernel's caches the file), and an idle service keeps little memory.
                c.pragma_update(None, "cache_size", -512)?;
                c
            }
        };
        let r = f(&conn);
        // A connection left inside a transaction (an error mid-read) is not reused.
        if conn.is_autocommit() {
            let mut kept = self.readers.lock().unwrap_or_else(|p| p.into_inner());
            if kept.len() < READERS_KEPT {
                kept.push(conn);
            }
        }
        r
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent (transactions roll
        // back on drop), so a poisoned mutex is safe to keep using.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Inventory for Store {
    fn server(&self, hostname: &str) -> Result<Option<Server>> {
        let conn = self.conn();
        Ok(conn
            .query_row(
                &format!("{SERVER_SELECT} WHERE hostname = ?1"),
                [hostname],
                server_from_row,
            )
            .optional()?)
    }

    fn servers(&self) -> Result<Vec<Server>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!("{SERVER_SELECT} ORDER BY hostname"))?;
        let rows = stmt.query_map([], server_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn servers_in(&self, statuses: &[ServerStatus]) -> Result<Vec<Server>> {
        let list: Vec<String> = statuses
            .iter()
            .map(|s| format!("'{}'", s.as_str()))
            .collect();
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "{SERVER_SELECT} WHERE status IN ({}) ORDER BY hostname",
            list.join(", ")
        ))?;
        let rows = stmt.query_map([], server_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn remote_servers(&self, local: &str) -> Result<Vec<Server>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "{SERVER_SELECT} WHERE hostname <> ?1 AND inventory_only = 0 ORDER BY hostname"
        ))?;
        let rows = stmt.query_map([local], server_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn unjoined_servers(&self, local: &str) -> Result<Vec<Server>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "{SERVER_SELECT} WHERE hostname <> ?1 AND inventory_only = 0 \
             AND status NOT IN ('DECOMMISSIONED', 'INIT_FAIL') \
             AND NOT EXISTS (SELECT 1 FROM hosts h WHERE h.hostname = servers.hostname \
                             AND h.joined_at IS NOT NULL) \
             ORDER BY hostname"
        ))?;
        let rows = stmt.query_map([local], server_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn units_unsettled(&self) -> Result<Vec<Unit>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "{UNIT_SELECT} WHERE {UNSETTLED} ORDER BY u.hostname, u.first_cpu"
        ))?;
        let rows = stmt.query_map([], unit_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn unit_counts(&self) -> Result<UnitCounts> {
        self.read(|conn| {
            Ok(conn.query_row(
                "SELECT count(*), count(*) FILTER (WHERE status = 'ALLOCATED'), \
                 (SELECT count(*) FROM servers) FROM compute_units",
                [],
                |r| {
                    Ok(UnitCounts {
                        total: r.get::<_, i64>(0)?.max(0).unsigned_abs(),
                        allocated: r.get::<_, i64>(1)?.max(0).unsigned_abs(),
                        servers: r.get::<_, i64>(2)?.max(0).unsigned_abs(),
                    })
                },
            )?)
        })
    }

    fn list_units(
        &self,
        f: &UnitFilter,
        stamp: &mut dyn FnMut(&str) -> bool,
        each: &mut dyn FnMut(&UnitRow<'_>) -> Result<()>,
    ) -> Result<()> {
        let (sql, args) = unit_query(LIST_SELECT, f);
        self.read(|conn| {
            // One read transaction: the counter and the rows come from the same snapshot.
            let tx = conn.unchecked_transaction()?;
            let n: i64 = tx
                .prepare_cached("SELECT n FROM kloigos_generation WHERE id = 1")?
                .query_row([], |r| r.get(0))?;
            if !stamp(&format!("s{n}")) {
                return Ok(());
            }
            let mut stmt = tx.prepare_cached(&sql)?;
            let mut rows = stmt.query(rusqlite::params_from_iter(args))?;
            while let Some(r) = rows.next()? {
                let bad = |i: usize, e: rusqlite::types::FromSqlError| {
                    StoreError::Corrupt(format!("list column {i}: {e}"))
                };
                let text =
                    |i: usize| -> Result<&str> { r.get_ref(i)?.as_str().map_err(|e| bad(i, e)) };
                let opt = |i: usize| -> Result<Option<&str>> {
                    r.get_ref(i)?.as_str_or_null().map_err(|e| bad(i, e))
                };
                each(&UnitRow {
                    compute_id: text(0)?,
                    hostname: text(1)?,
                    ip: text(2)?,
                    region: text(3)?,
                    zone: text(4)?,
                    cpu_range: text(5)?,
                    cpu_count: r.get(6)?,
                    uid: r.get(7)?,
                    user: text(8)?,
                    ports_range: text(9)?,
                    status: text(10)?,
                    started_at: opt(11)?,
                    tags: opt(12)?,
                    allocated_by: opt(13)?,
                    problem: opt(14)?,
                })?;
            }
            Ok(())
        })
    }

    /// Registers a server as INITIALIZING with its units UNAVAILABLE, replacing a previous
    /// record only when that one is DECOMMISSIONED or INIT_FAIL. Returns the status of a
    /// blocking previous record instead when there is one.
    fn begin_init(
        &self,
        server: &Server,
        units: &[NewUnit],
    ) -> Result<std::result::Result<(), ServerStatus>> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let existing: Option<String> = tx
            .query_row(
                "SELECT status FROM servers WHERE hostname = ?1",
                [&server.hostname],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(status) = existing {
            let status: ServerStatus = status.parse().map_err(StoreError::Corrupt)?;
            if !matches!(
                status,
                ServerStatus::Decommissioned | ServerStatus::InitFail
            ) {
                return Ok(Err(status));
            }
            tx.execute(
                "DELETE FROM servers WHERE hostname = ?1",
                [&server.hostname],
            )?;
        }
        let ranges = serde_json::to_string(&server.cpu_ranges).map_err(corrupt)?;
        let limits = serde_json::to_string(&server.limits).map_err(corrupt)?;
        tx.execute(
            "INSERT INTO servers (hostname, ip, region, zone, status, cpu_ranges, port_base, \
             ports_per_cpu, uid_base, limits, created_at, updated_at, inventory_only) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?11, ?12)",
            params![
                server.hostname,
                server.ip,
                server.region,
                server.zone,
                ServerStatus::Initializing.as_str(),
                ranges,
                server.port_base,
                server.ports_per_cpu,
                server.uid_base,
                limits,
                server.created_at,
                server.inventory_only,
            ],
        )?;
        for u in units {
            tx.execute(
                "INSERT INTO compute_units (compute_id, hostname, cpu_range, cpu_count, first_cpu, \
                 uid, user, ports_range, status, updated_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![
                    u.compute_id,
                    server.hostname,
                    u.cpu_range.to_string(),
                    u.cpu_count,
                    u.first_cpu,
                    u.uid,
                    u.user,
                    u.ports_range.to_string(),
                    UnitStatus::Unavailable.as_str(),
                    server.created_at,
                ],
            )?;
        }
        tx.commit()?;
        Ok(Ok(()))
    }

    /// Sets a server's status; with `units`, also sets every unit of it in one transaction.
    fn set_inventory_only(&self, hostname: &str, on: bool) -> Result<()> {
        self.conn().execute(
            "UPDATE servers SET inventory_only = ?2, updated_at = ?3 WHERE hostname = ?1",
            params![hostname, on, crate::time::now()],
        )?;
        Ok(())
    }

    fn set_server_status(
        &self,
        hostname: &str,
        status: ServerStatus,
        units: Option<UnitStatus>,
    ) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let now = crate::time::now();
        tx.execute(
            "UPDATE servers SET status = ?2, updated_at = ?3 WHERE hostname = ?1",
            params![hostname, status.as_str(), now],
        )?;
        if let Some(us) = units {
            tx.execute(
                "UPDATE compute_units SET status = ?2, updated_at = ?3 WHERE hostname = ?1",
                params![hostname, us.as_str(), now],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Deletes a server's units (its record stays, with the status given).
    fn retire_server(&self, hostname: &str, status: ServerStatus) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute("DELETE FROM compute_units WHERE hostname = ?1", [hostname])?;
        tx.execute(
            "UPDATE servers SET status = ?2, updated_at = ?3 WHERE hostname = ?1",
            params![hostname, status.as_str(), crate::time::now()],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Removes a server and its units entirely (a failed init that was rolled back).
    fn delete_server(&self, hostname: &str) -> Result<()> {
        self.conn()
            .execute("DELETE FROM servers WHERE hostname = ?1", [hostname])?;
        Ok(())
    }

    fn unit(&self, compute_id: &str) -> Result<Option<Unit>> {
        let conn = self.conn();
        Ok(conn
            .query_row(
                &format!("{UNIT_SELECT} WHERE u.compute_id = ?1"),
                [compute_id],
                unit_from_row,
            )
            .optional()?)
    }

    fn units(&self, f: &UnitFilter) -> Result<Vec<Unit>> {
        let (sql, args) = unit_query(UNIT_SELECT, f);
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&sql)?;
        let rows = stmt.query_map(rusqlite::params_from_iter(args), unit_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Every unit of one server.
    /// Atomically picks a FREE unit of a READY server matching the request and marks it
    /// ALLOCATING with the owner's tags and key. Lowest hostname and CPU first.
    fn claim_free(&self, c: &Claim<'_>) -> Result<Option<Unit>> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        // From `start_at` on, then before it.
        let pick = |side: &str| -> rusqlite::Result<Option<String>> {
            tx.query_row(
                &format!(
                    "SELECT u.compute_id FROM compute_units u JOIN servers s ON s.hostname = u.hostname \
                     WHERE u.status = 'FREE' AND u.problem IS NULL AND s.status = 'READY' AND u.cpu_count = ?1 \
                     AND (?2 IS NULL OR s.region = ?2) AND (?3 IS NULL OR s.zone = ?3) \
                     AND s.inventory_only = ?4 \
                     AND (?4 = 1 OR s.hostname = ?5 OR EXISTS (SELECT 1 FROM hosts h \
                          WHERE h.hostname = s.hostname AND h.joined_at IS NOT NULL \
                          AND h.last_report_at >= ?6 AND h.unreachable_since IS NULL)) \
                     AND u.hostname {side} ?7 \
                     ORDER BY u.hostname, u.first_cpu LIMIT 1"
                ),
                params![
                    c.cpu_count,
                    c.region,
                    c.zone,
                    c.inventory_only,
                    c.local_hostname,
                    c.reported_since,
                    c.start_at.unwrap_or_default(),
                ],
                |r| r.get(0),
            )
            .optional()
        };
        let id = match pick(">=")? {
            Some(id) => Some(id),
            None if c.start_at.is_some() => pick("<")?,
            None => None,
        };
        let Some(id) = id else { return Ok(None) };
        let claim = super::new_claim();
        let tags = c
            .tags
            .map(|t| serde_json::to_string(t).map_err(corrupt))
            .transpose()?;
        tx.execute(
            "UPDATE compute_units SET status = 'ALLOCATING', tags = ?2, ssh_public_key = ?3, \
             allocated_by = ?4, started_at = NULL, updated_at = ?5, claim = ?6 WHERE compute_id = ?1",
            params![id, tags, c.ssh_public_key, c.actor, crate::time::now(), claim],
        )?;
        let unit = tx.query_row(
            &format!("{UNIT_SELECT} WHERE u.compute_id = ?1"),
            [&id],
            unit_from_row,
        )?;
        // The claim's audit row commits with it.
        insert_event(
            &tx,
            NewEvent {
                actor: c.actor,
                operation: "claim",
                compute_id: Some(&unit.compute_id),
                hostname: Some(&unit.hostname),
                result: Ok(()),
                before: Some(serde_json::json!({"status": "FREE"})),
                after: Some(serde_json::json!({
                    "status": "ALLOCATING", "claim": claim, "allocated_by": c.actor,
                })),
            },
        )?;
        tx.commit()?;
        Ok(Some(unit))
    }

    /// Records (or with `None` clears) what reconcile could not repair on a unit.
    fn set_problem(&self, compute_id: &str, problem: Option<&str>) -> Result<()> {
        self.conn().execute(
            "UPDATE compute_units SET problem = ?2 WHERE compute_id = ?1",
            params![compute_id, problem],
        )?;
        Ok(())
    }

    fn transition(
        &self,
        compute_id: &str,
        from: &[UnitStatus],
        to: UnitStatus,
        change: UnitChange,
    ) -> Result<Transition> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let t = transition_in(&tx, compute_id, from, to, change)?;
        tx.commit()?;
        Ok(t)
    }

    fn transition_logged(
        &self,
        compute_id: &str,
        from: &[UnitStatus],
        to: UnitStatus,
        change: UnitChange,
        event: NewEvent<'_>,
    ) -> Result<Transition> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let t = transition_in(&tx, compute_id, from, to, change)?;
        if matches!(t, Transition::Done(_)) {
            insert_event(&tx, event)?;
        }
        tx.commit()?;
        Ok(t)
    }

    fn record(&self, e: NewEvent<'_>) -> Result<i64> {
        insert_event(&self.conn(), e)
    }

    /// Deletes audit rows older than `before` (RFC 3339) and all but the newest `keep` rows.
    /// Returns how many went.
    fn prune_events(&self, before: Option<&str>, keep: Option<u64>) -> Result<usize> {
        let conn = self.conn();
        let mut n = 0;
        if let Some(t) = before {
            n += conn.execute("DELETE FROM events WHERE time < ?1", params![t])?;
        }
        if let Some(keep) = keep {
            n += conn.execute(
                "DELETE FROM events WHERE id <= \
                 (SELECT id FROM events ORDER BY id DESC LIMIT 1 OFFSET ?1)",
                params![i64::try_from(keep).unwrap_or(i64::MAX)],
            )?;
        }
        Ok(n)
    }

    /// Newest first.
    fn events(&self, f: &EventFilter) -> Result<Vec<Event>> {
        let mut sql = String::from(
            "SELECT id, time, actor, operation, compute_id, hostname, result, detail, before, after \
             FROM events WHERE 1=1",
        );
        let mut args: Vec<rusqlite::types::Value> = Vec::new();
        let mut add = |cond: &str, v: rusqlite::types::Value| {
            args.push(v);
            sql.push_str(&format!(" AND {cond} ?{}", args.len()));
        };
        use rusqlite::types::Value as V;
        for (cond, v) in [
            ("compute_id =", &f.compute_id),
            ("hostname =", &f.hostname),
            ("operation =", &f.operation),
            ("actor =", &f.actor),
            ("time >=", &f.since),
            ("time <", &f.until),
        ] {
            if let Some(v) = v {
                add(cond, V::Text(v.clone()));
            }
        }
        if let Some(b) = f.before_id {
            add("id <", V::Integer(b));
        }
        sql.push_str(&format!(
            " ORDER BY id DESC LIMIT {}",
            f.limit.clamp(1, 1000)
        ));
        let conn = self.conn();
        let mut stmt = conn.prepare(&sql)?;
        let rows = stmt.query_map(rusqlite::params_from_iter(args), event_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    // ---- fleet hosts ---------------------------------------------------------------------

    fn put_host(&self, hostname: &str, token_sha256: &str) -> Result<bool> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let changed = tx.execute(
            "UPDATE hosts SET token_sha256 = ?2 WHERE hostname = ?1",
            params![hostname, token_sha256],
        )?;
        if changed == 0 {
            tx.execute(
                "INSERT INTO hosts (hostname, token_sha256, created_at) VALUES (?1, ?2, ?3)",
                params![hostname, token_sha256, crate::time::now()],
            )?;
        }
        tx.commit()?;
        Ok(changed == 0)
    }

    fn delete_host(&self, hostname: &str) -> Result<bool> {
        Ok(self
            .conn()
            .execute("DELETE FROM hosts WHERE hostname = ?1", [hostname])?
            > 0)
    }

    fn host(&self, hostname: &str) -> Result<Option<HostRecord>> {
        Ok(self
            .conn()
            .query_row(
                &format!("{HOST_SELECT} WHERE hostname = ?1"),
                [hostname],
                host_from_row,
            )
            .optional()?)
    }

    fn hosts(&self) -> Result<Vec<HostRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!("{HOST_SELECT} ORDER BY hostname"))?;
        let rows = stmt.query_map([], host_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn host_by_token(&self, token_sha256: &str) -> Result<Option<String>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT hostname FROM hosts WHERE token_sha256 = ?1",
                [token_sha256],
                |r| r.get(0),
            )
            .optional()?)
    }

    fn host_joined(
        &self,
        hostname: &str,
        facts: &Value,
        poke_url: Option<&str>,
        version: &str,
    ) -> Result<()> {
        self.conn().execute(
            "UPDATE hosts SET facts = ?2, poke_url = ?3, version = ?4, \
             joined_at = COALESCE(joined_at, ?5) WHERE hostname = ?1",
            params![
                hostname,
                json_text(facts)?,
                poke_url,
                version,
                crate::time::now()
            ],
        )?;
        Ok(())
    }

    fn host_reported(&self, hostname: &str, report: &Value, version: &str) -> Result<()> {
        // The report carries the host's facts too: keep them current.
        let facts = report
            .get("facts")
            .filter(|f| f.is_object())
            .map(json_text)
            .transpose()?;
        self.conn().execute(
            "UPDATE hosts SET last_report = ?2, last_report_at = ?3, version = ?4, \
             facts = COALESCE(?5, facts), unreachable_since = NULL, unreachable_reason = NULL \
             WHERE hostname = ?1",
            params![
                hostname,
                json_text(report)?,
                crate::time::now(),
                version,
                facts
            ],
        )?;
        Ok(())
    }

    fn host_unreachable(&self, hostname: &str, reason: Option<&str>) -> Result<()> {
        let conn = self.conn();
        match reason {
            Some(r) => conn.execute(
                "UPDATE hosts SET unreachable_since = COALESCE(unreachable_since, ?2), \
                 unreachable_reason = ?3 WHERE hostname = ?1",
                params![
                    hostname,
                    crate::time::now(),
                    crate::audit::clip(r, crate::audit::MAX_TEXT).as_ref()
                ],
            )?,
            None => conn.execute(
                "UPDATE hosts SET unreachable_since = NULL, unreachable_reason = NULL \
                 WHERE hostname = ?1",
                [hostname],
            )?,
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(hostname: &str) -> Server {
        Server {
            hostname: hostname.into(),
            ip: "10.0.0.1".into(),
            region: "eu".into(),
            zone: "a".into(),
            status: ServerStatus::Initializing,
            cpu_ranges: vec!["0-1".parse().unwrap(), "2-3".parse().unwrap()],
            port_base: 2000,
            ports_per_cpu: 100,
            uid_base: 20000,
            limits: Limits::default(),
            inventory_only: false,
            created_at: crate::time::now(),
            updated_at: crate::time::now(),
        }
    }

    /// A claim as the service on host `h1` makes it.
    fn claim(
        s: &Store,
        cpu_count: u32,
        region: Option<&str>,
        tags: Option<&Value>,
        key: &str,
        actor: &str,
    ) -> Result<Option<Unit>> {
        s.claim_free(&Claim {
            cpu_count,
            region,
            zone: None,
            tags,
            ssh_public_key: key,
            actor,
            inventory_only: false,
            local_hostname: "h1",
            reported_since: "1970-01-01T00:00:00Z",
            start_at: None,
        })
    }

    fn units(h: &str) -> Vec<NewUnit> {
        (0..2)
            .map(|i| NewUnit {
                compute_id: format!("{h}_{}-{}", 2 * i, 2 * i + 1),
                cpu_range: CpuList::from_cpus([2 * i, 2 * i + 1]).unwrap(),
                cpu_count: 2,
                first_cpu: 2 * i,
                uid: 20000 + 2 * i,
                user: format!("u{}-{}", 2 * i, 2 * i + 1),
                ports_range: PortRanges(vec![(2000 + 200 * i as u16, 2199 + 200 * i as u16)]),
            })
            .collect()
    }

    #[test]
    fn init_claim_transition_and_filters() {
        let s = Store::open_in_memory().unwrap();
        assert_eq!(s.begin_init(&server("h1"), &units("h1")).unwrap(), Ok(()));
        // A second init of a live server is refused with its status.
        assert_eq!(
            s.begin_init(&server("h1"), &units("h1")).unwrap(),
            Err(ServerStatus::Initializing)
        );
        // Units of a server that is not READY cannot be claimed.
        assert!(claim(&s, 2, None, None, "k", "a").unwrap().is_none());
        s.set_server_status("h1", ServerStatus::Ready, Some(UnitStatus::Free))
            .unwrap();
        let tags = serde_json::json!({"deployment_id": "d1", "owner": "me"});
        let u = claim(&s, 2, Some("eu"), Some(&tags), "key", "alice")
            .unwrap()
            .unwrap();
        assert_eq!(u.compute_id, "h1_0-1");
        assert_eq!(u.status, UnitStatus::Allocating);
        assert!(claim(&s, 2, Some("us"), None, "k", "a").unwrap().is_none());
        assert!(claim(&s, 4, None, None, "k", "a").unwrap().is_none());
        let f = UnitFilter {
            deployment_id: Some("d1".into()),
            ..Default::default()
        };
        assert_eq!(s.units(&f).unwrap().len(), 1);
        match s
            .transition(
                "h1_0-1",
                &[UnitStatus::Free],
                UnitStatus::Allocated,
                UnitChange::default(),
            )
            .unwrap()
        {
            Transition::WrongState(UnitStatus::Allocating) => {}
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            s.transition(
                "nope",
                &[UnitStatus::Free],
                UnitStatus::Free,
                UnitChange::default()
            )
            .unwrap(),
            Transition::NotFound
        ));
        let Transition::Done(u) = s
            .transition(
                "h1_0-1",
                &[UnitStatus::Allocating],
                UnitStatus::Free,
                UnitChange::cleared(),
            )
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(
            (u.status, u.tags, u.ssh_public_key),
            (UnitStatus::Free, None, None)
        );
        assert_eq!(s.units(&f).unwrap().len(), 0);
        // A FREE unit reconcile could not repair is not handed out, until its mark is cleared;
        // a transition that clears the owner's fields clears the mark too.
        s.set_problem("h1_0-1", Some("home wrecked")).unwrap();
        assert_eq!(
            s.unit("h1_0-1").unwrap().unwrap().problem.as_deref(),
            Some("home wrecked")
        );
        let other = claim(&s, 2, None, None, "k", "a").unwrap().unwrap();
        assert_ne!(other.compute_id, "h1_0-1");
        let Transition::Done(u) = s
            .transition(
                &other.compute_id,
                &[UnitStatus::Allocating],
                UnitStatus::Free,
                UnitChange::cleared(),
            )
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(u.problem, None);
        s.set_problem("h1_0-1", None).unwrap();
        let again = claim(&s, 2, None, None, "k", "a").unwrap().unwrap();
        assert_eq!(again.compute_id, "h1_0-1");
        s.set_problem("h1_0-1", Some("x")).unwrap();
        let Transition::Done(u) = s
            .transition(
                "h1_0-1",
                &[UnitStatus::Allocating],
                UnitStatus::Free,
                UnitChange::cleared(),
            )
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(u.problem, None);
        let f = UnitFilter {
            status: Some("FREE".into()),
            cpu_count: Some(2),
            ..Default::default()
        };
        assert_eq!(s.units(&f).unwrap().len(), 2);
    }

    #[test]
    fn transition_logged_records_only_a_done_move() {
        let s = Store::open_in_memory().unwrap();
        s.begin_init(&server("h1"), &units("h1")).unwrap().unwrap();
        s.set_server_status("h1", ServerStatus::Ready, Some(UnitStatus::Free))
            .unwrap();
        let u = claim(&s, 2, None, None, "k", "alice").unwrap().unwrap();
        let ev = || NewEvent {
            actor: "alice",
            operation: "allocate",
            compute_id: Some("h1_0-1"),
            hostname: Some("h1"),
            result: Ok(()),
            before: None,
            after: None,
        };
        // The moves' rows (the claim has its own).
        let count = || {
            s.events(&EventFilter {
                limit: 10,
                operation: Some("allocate".into()),
                ..Default::default()
            })
            .unwrap()
            .len()
        };
        let t = s
            .transition_logged(
                &u.compute_id,
                &[UnitStatus::Allocating],
                UnitStatus::Allocated,
                UnitChange::default(),
                ev(),
            )
            .unwrap();
        assert!(matches!(t, Transition::Done(ref d) if d.status == UnitStatus::Allocated));
        assert_eq!(count(), 1);
        let t = s
            .transition_logged(
                &u.compute_id,
                &[UnitStatus::Allocating],
                UnitStatus::Free,
                UnitChange::cleared(),
                ev(),
            )
            .unwrap();
        assert!(matches!(t, Transition::WrongState(UnitStatus::Allocated)));
        assert_eq!(count(), 1);
    }

    #[test]
    fn events_page_newest_first() {
        let s = Store::open_in_memory().unwrap();
        for i in 0..5 {
            s.record(NewEvent {
                actor: "root",
                operation: if i % 2 == 0 { "allocate" } else { "deallocate" },
                compute_id: Some("h_0"),
                hostname: Some("h"),
                result: Ok(()),
                before: None,
                after: Some(serde_json::json!({"i": i})),
            })
            .unwrap();
        }
        let page = s
            .events(&EventFilter {
                limit: 2,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(page.iter().map(|e| e.id).collect::<Vec<_>>(), vec![5, 4]);
        let next = s
            .events(&EventFilter {
                limit: 10,
                before_id: Some(4),
                operation: Some("allocate".into()),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(next.iter().map(|e| e.id).collect::<Vec<_>>(), vec![3, 1]);
    }

    #[test]
    fn audit_rows_are_clipped_and_pruned() {
        let s = Store::open_in_memory().unwrap();
        let path = format!("GET /api/{}", "x".repeat(64 * 1024));
        let huge = "h".repeat(10_000);
        for _ in 0..10 {
            s.record(NewEvent {
                actor: &huge,
                operation: "authenticate",
                compute_id: Some(&huge),
                hostname: None,
                result: Err(&path),
                before: None,
                after: None,
            })
            .unwrap();
        }
        let all = |s: &Store| {
            s.events(&EventFilter {
                limit: 1000,
                ..Default::default()
            })
            .unwrap()
        };
        let rows = all(&s);
        let e = &rows[0];
        let detail = e.detail.as_deref().unwrap();
        assert!(detail.len() <= crate::audit::MAX_TEXT, "{}", detail.len());
        assert!(detail.starts_with("GET /api/xxx") && detail.ends_with("more bytes]"));
        assert!(e.actor.len() <= crate::audit::MAX_NAME);
        assert!(e.compute_id.as_ref().unwrap().len() <= crate::audit::MAX_NAME);
        // Age: the four oldest rows are from last year.
        s.conn()
            .execute(
                "UPDATE events SET time = '2025-01-01T00:00:00Z' WHERE id <= 4",
                [],
            )
            .unwrap();
        assert_eq!(
            s.prune_events(Some("2026-01-01T00:00:00Z"), None).unwrap(),
            4
        );
        assert_eq!(all(&s).len(), 6);
        // Count: the newest rows stay.
        assert_eq!(s.prune_events(None, Some(4)).unwrap(), 2);
        let ids: Vec<i64> = all(&s).iter().map(|e| e.id).collect();
        assert_eq!(ids, vec![10, 9, 8, 7]);
        assert_eq!(s.prune_events(None, Some(4)).unwrap(), 0);
        assert_eq!(s.prune_events(None, None).unwrap(), 0);
    }

    #[test]
    fn fleet_hosts_tokens_joins_reports_and_reachability() {
        let s = Store::open_in_memory().unwrap();
        assert!(s.host("h2").unwrap().is_none());
        assert!(s.put_host("h2", "aa").unwrap(), "a new host");
        assert!(
            !s.put_host("h2", "bb").unwrap(),
            "a known host gets a new token"
        );
        assert_eq!(
            s.host_by_token("aa").unwrap(),
            None,
            "the old token stops working"
        );
        assert_eq!(s.host_by_token("bb").unwrap().as_deref(), Some("h2"));
        // Two hosts cannot share a token hash.
        assert!(s.put_host("h3", "bb").is_err());
        assert!(s.put_host("h3", "cc").unwrap());
        let h = s.host("h2").unwrap().unwrap();
        assert_eq!((h.joined_at, h.facts, h.last_report), (None, None, None));

        let facts = serde_json::json!({"cpus_online": "0-3"});
        s.host_joined(
            "h2",
            &facts,
            Some("http://127.0.0.1:1/api/host/poke"),
            "0.1.0",
        )
        .unwrap();
        let joined = s.host("h2").unwrap().unwrap();
        assert_eq!(joined.facts.as_ref(), Some(&facts));
        assert_eq!(joined.version.as_deref(), Some("0.1.0"));
        let first_join = joined.joined_at.clone().unwrap();
        s.host_joined("h2", &facts, None, "0.1.1").unwrap();
        let again = s.host("h2").unwrap().unwrap();
        assert_eq!(
            again.joined_at.as_deref(),
            Some(first_join.as_str()),
            "joined_at stays"
        );
        assert_eq!(again.poke_url, None);

        s.host_unreachable("h2", Some("connection refused"))
            .unwrap();
        let down = s.host("h2").unwrap().unwrap();
        let since = down.unreachable_since.clone().unwrap();
        s.host_unreachable("h2", Some("timed out")).unwrap();
        let still = s.host("h2").unwrap().unwrap();
        assert_eq!(still.unreachable_since.as_deref(), Some(since.as_str()));
        assert_eq!(still.unreachable_reason.as_deref(), Some("timed out"));

        let report =
            serde_json::json!({"as_of": "x", "facts": {"cpus_online": "0-7"}, "units": []});
        s.host_reported("h2", &report, "0.2.0").unwrap();
        let r = s.host("h2").unwrap().unwrap();
        assert_eq!(r.last_report.as_ref(), Some(&report));
        assert!(r.last_report_at.is_some());
        assert_eq!(r.version.as_deref(), Some("0.2.0"));
        assert_eq!(r.facts, Some(serde_json::json!({"cpus_online": "0-7"})));
        assert_eq!((r.unreachable_since, r.unreachable_reason), (None, None));
        s.host_unreachable("h2", Some("down")).unwrap();
        s.host_unreachable("h2", None).unwrap();
        assert_eq!(s.host("h2").unwrap().unwrap().unreachable_since, None);

        let names: Vec<String> = s.hosts().unwrap().into_iter().map(|h| h.hostname).collect();
        assert_eq!(names, ["h2", "h3"]);
        assert!(s.delete_host("h2").unwrap());
        assert!(!s.delete_host("h2").unwrap());
        assert_eq!(s.host_by_token("bb").unwrap(), None);
    }

    #[test]
    fn claims_skip_stale_unreachable_and_unjoined_hosts() {
        let s = Store::open_in_memory().unwrap();
        s.begin_init(&server("h2"), &units("h2")).unwrap().unwrap();
        s.set_server_status("h2", ServerStatus::Ready, Some(UnitStatus::Free))
            .unwrap();
        let pick = |since: &str| {
            s.claim_free(&Claim {
                cpu_count: 2,
                region: None,
                zone: None,
                tags: None,
                ssh_public_key: "k",
                actor: "a",
                inventory_only: false,
                local_hostname: "h1",
                reported_since: since,
                start_at: None,
            })
            .unwrap()
        };
        assert!(pick("1970-01-01T00:00:00Z").is_none(), "h2 never joined");
        s.put_host("h2", "t").unwrap();
        s.host_joined("h2", &serde_json::json!({}), None, "0.1.0")
            .unwrap();
        assert!(pick("1970-01-01T00:00:00Z").is_none(), "h2 never reported");
        s.host_reported("h2", &serde_json::json!({}), "0.1.0")
            .unwrap();
        s.host_unreachable("h2", Some("refused")).unwrap();
        assert!(pick("1970-01-01T00:00:00Z").is_none(), "h2 is unreachable");
        s.host_reported("h2", &serde_json::json!({}), "0.1.0")
            .unwrap();
        assert!(
            pick("2999-01-01T00:00:00Z").is_none(),
            "h2's report is stale"
        );
        let u = pick("1970-01-01T00:00:00Z").unwrap();
        assert_eq!(u.hostname, "h2");
        assert_eq!(u.claim.as_ref().map(String::len), Some(32));
    }
}
