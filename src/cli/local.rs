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

/// The service on this host's inventory.
fn open(local: &Local) -> Result<Kloigos> {
    Kloigos::open(&local.config()).map_err(|source| CliError::Open {
        path: local.db.clone(),
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

pub(super) fn doctor(root: &Path, as_json: bool) -> Result<()> {
    let live = crate::apply::Host::new(root).is_live();
    let sshd_t = if live {
        crate::doctor::sshd_effective_config()
    } else {
        None
    };
    let checks = crate::doctor::checks(root, sshd_t.as_deref());
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

pub(super) fn serve(
    local: Local,
    listen: Vec<String>,
    idle_timeout: u64,
    no_reconcile: bool,
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
    let units = k.units(&Default::default())?;
    let allocated = units
        .iter()
        .filter(|u| u.status == crate::store::UnitStatus::Allocated)
        .count();
    let status = format!(
        "{} units, {allocated} allocated, host {} (root {})",
        units.len(),
        k.local_hostname(),
        local.root.display()
    );
    let mut app = crate::api::App::new(k, tokens);
    app.tcp_anonymous = guard.tcp_anonymous_role;
    app.allowed_hosts = guard
        .allowed_hosts
        .iter()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .collect();
    app.body_timeout = secs(guard.body_timeout);
    app.denials = std::sync::Mutex::new(crate::audit::DenialLimiter::new(
        Duration::from_secs(guard.audit_denial_window.max(1)),
        crate::audit::DENIALS_PER_WINDOW,
    ));
    let state = std::sync::Arc::new(app);
    let retention = crate::audit::Retention {
        days: guard.audit_retention_days,
        max_rows: guard.audit_max_rows,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(CliError::io("cannot start the async runtime"))?;
    rt.spawn(crate::api::housekeeping(state.clone(), retention));
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
        },
    ))
    .map_err(CliError::io("serving the API"))?;
    Ok(())
}
