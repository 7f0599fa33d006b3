//! The local commands: `serve`, `reconcile`, `render`, `doctor` and `token`, which act on this
//! host and its inventory directly instead of through the API.

use super::error::{CliError, Result};
use super::output::{print_table, printable};
use super::{Guard, Local, TokenAction};
use crate::service::Kloigos;
use std::path::Path;
use std::time::Duration;

fn secs(s: f64) -> Duration {
    Duration::try_from_secs_f64(s.max(0.001)).unwrap_or(Duration::from_secs(3600))
}

/// The service on this host's inventory. A joined host is the hostname it joined as.
fn open(local: &Local) -> Result<Kloigos> {
    let mut config = local.config();
    if config.hostname.is_none() {
        config.hostname = crate::fleet::JoinConfig::load(&local.root)?.map(|j| j.hostname);
    }
    Kloigos::open(&config).map_err(|source| CliError::Open {
        db: local.db.to_string(),
        source,
    })
}

/// `kloigos token ...`: the token file, edited in place.
pub(super) fn token(tokens: &Path, action: TokenAction, as_json: bool) -> Result<()> {
    let t = crate::auth::Tokens::new(tokens);
    match action {
        TokenAction::Create { name, role } => println!("{}", t.create(&name, role)?),
        TokenAction::List => {
            let entries = t.list()?;
            if as_json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
            } else {
                print_table(
                    &["NAME", "ROLE", "CREATED"],
                    entries
                        .iter()
                        .map(|e| vec![e.name.clone(), e.role.to_string(), e.created.clone()])
                        .collect(),
                );
            }
        }
        TokenAction::Revoke { name } => {
            if !t.revoke(&name)? {
                return Err(CliError::Usage(format!(
                    "no token named {name:?} in {}",
                    tokens.display()
                )));
            }
            println!("token {name} revoked");
        }
    }
    Ok(())
}

/// `kloigos reconcile`: repairs this host from the inventory and prints what it did.
pub(super) fn reconcile(local: &Local, as_json: bool) -> Result<()> {
    let k = open(local)?;
    let report = k.reconcile(&actor())?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else if report.is_clean() {
        println!("reconcile: nothing to do");
    } else {
        for (what, items) in [
            ("written", &report.files_changed),
            ("removed", &report.files_removed),
            ("unit", &report.units_fixed),
            ("server", &report.servers_fixed),
            ("FAILED", &report.units_failed),
        ] {
            for i in items {
                println!("{what}: {}", printable(i));
            }
        }
    }
    if !report.units_failed.is_empty() {
        return Err(CliError::Problems(format!(
            "{} unit(s) could not be repaired (marked with a problem; see above)",
            report.units_failed.len()
        )));
    }
    Ok(())
}

/// `kloigos render`: every rendered file, printed or written under `out`.
pub(super) fn render(local: &Local, out: Option<&Path>) -> Result<()> {
    let k = open(local)?;
    let files = k.render_all()?;
    match out {
        Some(dir) => {
            let host = crate::apply::Host::new(dir);
            for f in &files {
                host.write(f, None)?;
                println!("{}", host.path(&f.path).display());
            }
        }
        None => {
            for (name, source) in k.template_sources() {
                println!("# template {name}: {source}");
            }
            for f in &files {
                println!("==> /{} <==\n{}", f.path.display(), f.content);
            }
        }
    }
    Ok(())
}

pub(super) fn doctor(root: &Path, db: &crate::store::DbTarget, as_json: bool) -> Result<()> {
    let live = crate::apply::Host::new(root).is_live();
    let sshd_t = if live {
        crate::doctor::sshd_effective_config()
    } else {
        None
    };
    let mut checks = crate::doctor::checks(root, sshd_t.as_deref());
    checks.push(crate::doctor::Check::inventory(db));
    if as_json {
        println!("{}", serde_json::to_string_pretty(&checks)?);
    } else {
        for c in &checks {
            println!(
                "{} {}: {}",
                if c.ok { "ok  " } else { "FAIL" },
                c.name,
                c.detail
            );
        }
    }
    let failed: Vec<&str> = checks.iter().filter(|c| !c.ok).map(|c| c.name).collect();
    if !failed.is_empty() {
        return Err(CliError::Problems(format!(
            "{} problem(s): {}",
            failed.len(),
            failed.join(", ")
        )));
    }
    Ok(())
}

/// The audit log's name for whoever runs a local command, as the API would name them.
fn actor() -> String {
    let caller = crate::auth::unix_caller(
        nix::unistd::getuid().as_raw(),
        nix::unistd::getgid().as_raw(),
    );
    format!("{} cli", caller.actor)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CliError::io("cannot start the async runtime"))
}

fn print_report(r: &crate::fleet::Report, as_json: bool) -> Result<()> {
    if as_json {
        println!("{}", serde_json::to_string_pretty(r)?);
        return Ok(());
    }
    match &r.server {
        None => println!("server: none"),
        Some(s) if s.ok => println!("server: set up (created {})", s.created_at),
        Some(s) => println!(
            "server: FAILED: {}",
            printable(s.error.as_deref().unwrap_or("?"))
        ),
    }
    for u in &r.units {
        let state = if u.owned { "owned" } else { "free" };
        match &u.error {
            None => println!("unit {}: {state}", printable(&u.compute_id)),
            Some(e) => println!(
                "unit {}: {state}, FAILED: {}{}",
                printable(&u.compute_id),
                printable(e),
                if u.rolled_back { " (rolled back)" } else { "" }
            ),
        }
    }
    for d in &r.drift {
        println!("drift repaired: {}", printable(d));
    }
    Ok(())
}

/// The problems of a report (a failed server or unit), as an error after printing it.
fn report_problems(r: &crate::fleet::Report) -> Result<()> {
    let failed = r.units.iter().filter(|u| !u.ok).count()
        + r.server.as_ref().map_or(0, |s| usize::from(!s.ok));
    if failed > 0 {
        return Err(CliError::Problems(format!(
            "{failed} part(s) of the desired state could not be applied (reported to the hub)"
        )));
    }
    Ok(())
}

/// `kloigos pull`: one pull of this joined host.
pub(super) fn pull(local: &Local, as_json: bool) -> Result<()> {
    let k = std::sync::Arc::new(Box::new(open(local)?));
    let report = runtime()?.block_on(crate::fleet::pull_host(
        k,
        local.root.clone(),
        crate::service::Pass::Full,
    ))?;
    print_report(&report, as_json)?;
    report_problems(&report)
}

/// `kloigos leave`: see the command's help. Each step can be run again after an
/// interruption: the last pull, the timer, the join file (the host is standalone from then
/// on), the token (a leftover one is removed by a new `leave`), the service.
pub(super) fn leave(local: &Local, force: bool, as_json: bool) -> Result<()> {
    let Some(join) = crate::fleet::JoinConfig::load(&local.root)? else {
        if crate::fleet::token_left(&local.root) {
            let removed = crate::fleet::remove_join_files(&local.root)?;
            eprintln!("not joined; removed the host token left by an interrupted leave");
            if as_json {
                println!("{}", serde_json::json!({"left": null, "removed": removed}));
            }
            return Ok(());
        }
        return Err(CliError::Usage(
            "this host has not joined a hub (nothing to leave)".into(),
        ));
    };
    let k = std::sync::Arc::new(Box::new(open(local)?));
    // The last pull: what the hub took away is torn down here and reported.
    let pulled = runtime()?.block_on(crate::fleet::pull_host(
        k.clone(),
        local.root.clone(),
        crate::service::Pass::Full,
    ));
    let kept = match (&pulled, force) {
        (Ok(r), _) if r.server.is_none() => None,
        (Ok(r), true) => r.server.as_ref().map(|_| join.hostname.clone()),
        (Ok(_), false) => {
            return Err(CliError::Problems(format!(
                "the hub still has a server for {h}: decommission it through the hub first                  (`kloigos --url HUB decommission {h}`; this host tears it down at its next                  pull), or pass --force to keep it here as this host's own",
                h = join.hostname
            )));
        }
        (Err(e), false) => {
            return Err(CliError::Problems(format!(
                "cannot ask the hub whether it still has a server for {}: {}; pass --force to                  leave anyway (what this host applied stays, as its own)",
                join.hostname,
                crate::error::Chain(e)
            )));
        }
        (Err(_), true) => k
            .servers()?
            .into_iter()
            .find(|s| crate::plan::is_planned(s, k.local_hostname()))
            .map(|s| s.hostname),
    };
    // No pull may run while the join files go.
    let pulling = k.pull_lock()?;
    let mut notes = Vec::new();
    let live = k.host().is_live();
    if live {
        let out = std::process::Command::new("systemctl")
            .args(["disable", "--now", "kloigos-pull.timer"])
            .output()
            .map_err(CliError::io("cannot run systemctl"))?;
        if !out.status.success() {
            return Err(CliError::Problems(format!(
                "disabling kloigos-pull.timer failed (nothing removed; run `kloigos leave`                  again): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        notes.push("kloigos-pull.timer disabled".to_string());
    }
    let removed = crate::fleet::remove_join_files(&local.root)?;
    notes.extend(removed.iter().map(|r| format!("{r} removed")));
    // (A stopping service waits for its pull, which may wait for this lock.)
    drop(pulling);
    if live {
        // A running service forgets its hubs (pokes 404, local writes again) when it starts.
        let _ = std::process::Command::new("systemctl")
            .args(["try-restart", "kloigos.service"])
            .status();
    }
    tracing::info!(operation = "leave", hubs = ?join.hubs, kept = ?kept, "left the hub");
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "left": join.hubs, "hostname": join.hostname, "server_kept": kept,
                "removed": removed,
            }))?
        );
    } else {
        println!("left {} ({})", join.hubs.join(", "), notes.join("; "));
        match &kept {
            Some(h) => println!(
                "server {h} stays as this host's own; on the hub, decommission it and remove the                  host: `kloigos host remove {}`",
                join.hostname
            ),
            None => println!(
                "on the hub, remove the host: `kloigos host remove {}`",
                join.hostname
            ),
        }
    }
    Ok(())
}

/// `kloigos join`: report the facts to a hub, keep the join files, enable the timer, pull.
pub(super) fn join(
    local: &Local,
    hubs: Vec<String>,
    token_file: &Path,
    poke_url: Option<String>,
    force: bool,
    as_json: bool,
) -> Result<()> {
    let k = open(local)?;
    // A standalone host's own units would be torn down by the first pull: say so first.
    let joined = crate::fleet::JoinConfig::load(&local.root)?.is_some();
    if !joined && !force {
        let own: Vec<String> = k
            .servers()?
            .into_iter()
            .filter(|s| crate::plan::is_planned(s, k.local_hostname()))
            .map(|s| s.hostname)
            .collect();
        if !own.is_empty() {
            return Err(CliError::Problems(format!(
                "this host has its own server {} in its inventory; once joined, the hub's state \
                 replaces it and its units are torn down (users, files, processes). Decommission \
                 it first (`kloigos decommission {}`), or pass --force",
                own.join(", "),
                own[0]
            )));
        }
    }
    let token = crate::fleet::read_token(token_file)?;
    let join = crate::fleet::JoinConfig {
        hubs,
        hostname: k.local_hostname().to_string(),
        poke_url,
    };
    let facts = crate::fleet::Facts::gather(&local.root);
    let rt = runtime()?;
    let hub = rt.block_on(crate::fleet::join(&join, &token, &facts))?;
    crate::fleet::write_join_files(&local.root, &join, &token)?;
    eprintln!("joined {hub} as {}", join.hostname);
    if k.host().is_live() {
        let out = std::process::Command::new("systemctl")
            .args(["enable", "--now", "kloigos-pull.timer"])
            .output()
            .map_err(CliError::io("cannot run systemctl"))?;
        if !out.status.success() {
            return Err(CliError::Problems(format!(
                "joined, but enabling kloigos-pull.timer failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        // A running service learns it is joined (pokes, 409 for writes) when it starts.
        let _ = std::process::Command::new("systemctl")
            .args(["try-restart", "kloigos.service"])
            .status();
    }
    let k = std::sync::Arc::new(Box::new(k));
    let report = rt.block_on(crate::fleet::pull_host(
        k,
        local.root.clone(),
        crate::service::Pass::Full,
    ))?;
    print_report(&report, as_json)?;
    report_problems(&report)
}

#[allow(clippy::too_many_arguments)] // one per option of `kloigos serve`
pub(super) fn serve(
    local: Local,
    listen: Vec<String>,
    idle_timeout: u64,
    no_reconcile: bool,
    pull_interval: f64,
    tokens: crate::auth::Tokens,
    guard: Guard,
    systemd_listeners: Vec<crate::server::Listener>,
) -> Result<()> {
    crate::server::raise_fd_limit();
    let mut listeners = systemd_listeners;
    for addr in &listen {
        listeners.push(
            crate::server::bind(addr).map_err(CliError::io(format!("cannot listen on {addr}")))?,
        );
    }
    if listeners.is_empty() {
        return Err(CliError::Usage(
            "no socket to serve on: pass --listen ADDR, or start through kloigos.socket".into(),
        ));
    }
    let mut k = open(&local)?;
    k.set_apply_timeout(secs(guard.apply_timeout));
    k.set_placement(guard.placement);
    if !no_reconcile {
        // Whatever reconcile could not repair is reported (and units marked and audited);
        // the API stays up so an admin can see and fix it.
        match k.reconcile("kloigos serve (start)") {
            Ok(report) if !report.units_failed.is_empty() => {
                tracing::error!(?report, "reconciled at start; some units need an admin");
            }
            Ok(report) if !report.is_clean() => tracing::info!(?report, "reconciled at start"),
            Ok(_) => {}
            Err(e) => tracing::error!(
                error = %crate::error::Chain(&e),
                "reconcile at start failed; serving anyway"
            ),
        }
    }
    let host = format!(
        "host {} (root {})",
        k.local_hostname(),
        local.root.display()
    );
    let mut app = crate::api::App::new(k, tokens);
    app.list_cache.set_dir(Some(list_cache_dir(&local.db)));
    // A tuning knob (and the tests' way to send small lists through the file cache).
    if let Some(n) = std::env::var("KLOIGOS_LIST_CACHE_MEMORY")
        .ok()
        .and_then(|v| v.trim().parse().ok())
    {
        app.list_cache.set_memory_max(n);
    }
    app.tcp_anonymous = guard.tcp_anonymous_role;
    app.allowed_hosts = guard
        .allowed_hosts
        .iter()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .collect();
    app.body_timeout = secs(guard.body_timeout);
    let joined = crate::fleet::JoinConfig::load(&local.root)?;
    let puller =
        joined.map(|j| crate::fleet::Puller::new(j, crate::fleet::min_interval_from_env()));
    app.puller = puller.clone();
    app.denials = std::sync::Mutex::new(crate::audit::DenialLimiter::new(
        Duration::from_secs(guard.audit_denial_window.max(1)),
        crate::audit::DENIALS_PER_WINDOW,
    ));
    let state = std::sync::Arc::new(app);
    // The counts are read once serving: at fleet scale they read a large index.
    let counted = state.clone();
    let status = Box::new(move || match counted.kloigos.unit_counts() {
        Ok(c) => format!("{} units, {} allocated, {host}", c.total, c.allocated),
        Err(e) => format!("{host}; units not counted: {}", crate::error::Chain(&e)),
    });
    let retention = crate::audit::Retention {
        days: guard.audit_retention_days,
        max_rows: guard.audit_max_rows,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(CliError::io("cannot start the async runtime"))?;
    rt.spawn(crate::api::housekeeping(state.clone(), retention));
    let busy = puller.clone().map(|p| {
        std::sync::Arc::new(move || p.busy()) as std::sync::Arc<dyn Fn() -> bool + Send + Sync>
    });
    if let Some(p) = puller {
        let (st, root) = (state.clone(), local.root.clone());
        rt.spawn(
            p.clone()
                .run(move |pass| pull_logged(st.clone(), root.clone(), pass)),
        );
        // The first pull, after the start-up reconcile.
        p.request();
        if pull_interval > 0.0 {
            let every = secs(pull_interval);
            rt.spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    p.request_full();
                }
            });
        }
    }
    rt.block_on(crate::server::serve(
        listeners,
        crate::api::router(state),
        crate::server::ServeOptions {
            idle_timeout: (idle_timeout > 0).then(|| Duration::from_secs(idle_timeout)),
            status,
            header_timeout: secs(guard.header_timeout),
            caps: crate::server::Caps {
                per_user: guard.max_connections_per_user.max(1),
                users: guard.max_user_connections.max(1),
                tcp: guard.max_tcp_connections.max(1),
            },
            busy,
        },
    ))
    .map_err(CliError::io("serving the API"))?;
    Ok(())
}

/// One pull of `kloigos serve`, its outcome logged; a failed pull is retried at the next poke,
/// interval or timer.
async fn pull_logged(
    state: crate::api::AppState,
    root: std::path::PathBuf,
    pass: crate::service::Pass,
) {
    let t0 = std::time::Instant::now();
    let pulled = crate::fleet::pull_host(state, root, pass).await;
    let ms = u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX);
    match pulled {
        Ok(r) => {
            let failed: Vec<&str> = r
                .units
                .iter()
                .filter(|u| !u.ok)
                .map(|u| u.compute_id.as_str())
                .collect();
            if !failed.is_empty() || r.server.as_ref().is_some_and(|s| !s.ok) {
                tracing::error!(operation = "pull", as_of = %r.as_of, ms, ?failed, server = ?r.server, "pulled; some of the desired state could not be applied");
            } else if !r.drift.is_empty() {
                tracing::warn!(operation = "pull", as_of = %r.as_of, ms, drift = ?r.drift, "pulled; drift repaired");
            } else {
                tracing::info!(operation = "pull", as_of = %r.as_of, ms, units = r.units.len(), "pulled");
            }
        }
        Err(e) => tracing::error!(
            operation = "pull",
            ms,
            error = %crate::error::Chain(&e),
            "pull failed; retried at the next poke or timer"
        ),
    }
}

/// Where lists too large to keep in memory are kept (in unnamed files): systemd's
/// `CacheDirectory=` (`$CACHE_DIRECTORY`), else the SQLite database's directory, else the
/// temporary directory. Each is root's alone or shared only by name-less files.
fn list_cache_dir(db: &crate::store::DbTarget) -> std::path::PathBuf {
    if let Some(dir) = std::env::var_os("CACHE_DIRECTORY")
        .and_then(|v| {
            v.to_str()
                .and_then(|v| v.split(':').next())
                .map(std::path::PathBuf::from)
        })
        .filter(|d| d.is_absolute())
    {
        return dir;
    }
    match db {
        crate::store::DbTarget::Sqlite(path) => match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => std::path::PathBuf::from("."),
        },
        crate::store::DbTarget::Postgres(_) => std::env::temp_dir(),
    }
}
