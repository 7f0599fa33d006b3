//! The operations of Kloigos: init_server (here), allocate and deallocate (`allocate`),
//! decommission (`decommission`) and reconcile (`reconcile`).
//! Each one validates, records its intent in the store, applies it to the host through
//! `apply::Host`, then records the outcome, so a crash at any point leaves a state that
//! `reconcile` finishes or rolls back. Host-changing operations hold an exclusive file lock, so
//! the service and a `kloigos reconcile` run by hand never interleave.

use crate::apply::{ApplyError, ApplyReport, ErrorList, Host, Scope, converge};
use crate::model::{self, CpuList, PortPlan, names, validate::SshKey};
use crate::plan::{self, Desired};
use crate::render::{HostFacts, RenderError, RenderedFile, Renderer, UnitPlan};
use crate::store::{
    Event, EventFilter, Limits, NewEvent, NewUnit, Server, ServerStatus, Store, StoreError, Unit,
    UnitFilter, UnitStatus,
};
use serde_json::{Value, json};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tracing::{error, info, warn};

mod allocate;
mod decommission;
mod reconcile;

/// One validation problem, in the shape FastAPI reports (`loc`, `msg`, `type`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct FieldError {
    #[serde(rename = "type")]
    pub kind: String,
    pub loc: Vec<Value>,
    pub msg: String,
    pub input: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ctx: Option<Value>,
}

impl FieldError {
    /// A semantic check that failed (pydantic's `value_error`).
    pub fn value(loc: Vec<Value>, input: Value, reason: impl Into<String>) -> FieldError {
        let reason = reason.into();
        FieldError {
            kind: "value_error".into(),
            loc,
            msg: format!("Value error, {reason}"),
            input,
            ctx: Some(json!({ "error": reason })),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("validation failed")]
    Invalid(Vec<FieldError>),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Failed(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Render(#[from] RenderError),
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error(transparent)]
    Teardown(#[from] ErrorList),
    #[error("lock {}: {source}", path.display())]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, OpError>;

/// A validated init_server request.
#[derive(Debug, Clone)]
pub struct InitServer {
    pub hostname: String,
    pub ip: String,
    pub region: String,
    pub zone: String,
    pub cpu_ranges: Vec<CpuList>,
    pub ports: PortPlan,
    pub uid_base: u32,
    pub limits: Limits,
}

pub const DEFAULT_UID_BASE: u32 = 20000;

/// A validated allocate request.
#[derive(Debug, Clone)]
pub struct Allocate {
    pub cpu_count: u32,
    pub region: Option<String>,
    pub zone: Option<String>,
    pub tags: Option<Value>,
    pub ssh_key: SshKey,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub db: PathBuf,
    pub root: PathBuf,
    pub templates: Vec<PathBuf>,
    /// The name of the host this process runs on; units of other hosts are inventory only.
    pub hostname: Option<String>,
    /// How long deallocation lets processes handle SIGTERM before SIGKILL.
    pub kill_grace: Duration,
}

/// What reconcile did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct ReconcileReport {
    pub files_changed: Vec<String>,
    pub files_removed: Vec<String>,
    pub units_fixed: Vec<String>,
    pub servers_fixed: Vec<String>,
    /// Units reconcile could not repair (`id: why`); each is marked (`problem`) and audited,
    /// and the others are served.
    pub units_failed: Vec<String>,
}

impl ReconcileReport {
    pub fn is_clean(&self) -> bool {
        self.files_changed.is_empty()
            && self.files_removed.is_empty()
            && self.units_fixed.is_empty()
            && self.servers_fixed.is_empty()
            && self.units_failed.is_empty()
    }
}

/// All or nothing, for operations that must set up every unit (init_server, decommission).
fn all_ok(report: ApplyReport) -> Result<()> {
    if report.failed.is_empty() {
        Ok(())
    } else {
        let msgs: Vec<String> = report
            .failed
            .iter()
            .map(|(id, e)| format!("{id}: {e}"))
            .collect();
        Err(OpError::Failed(msgs.join("; ")))
    }
}

/// Who does what to which unit or server, for [`Kloigos::conclude`].
struct Op<'a> {
    actor: &'a str,
    operation: &'static str,
    compute_id: Option<&'a str>,
    hostname: &'a str,
    before: Option<Value>,
}

pub struct Kloigos {
    pub store: Store,
    host: Host,
    renderer: Renderer,
    local: String,
    lock_path: PathBuf,
    kill_grace: Duration,
    facts: HostFacts,
}

/// The hostname of the machine (or of the fake root's /etc/hostname).
fn local_hostname(root: &Path, live: bool) -> String {
    if !live && let Ok(h) = std::fs::read_to_string(root.join("etc/hostname")) {
        return h.trim().to_string();
    }
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

/// The JSON an audit record keeps of a unit.
pub fn unit_json(u: &Unit) -> Value {
    json!({
        "compute_id": u.compute_id,
        "status": u.status,
        "started_at": u.started_at,
        "tags": u.tags,
        "allocated_by": u.allocated_by,
    })
}

/// Seconds to sleep at pause point `point`, given the value of `KLOIGOS_TEST_PAUSE`
/// (`allocate:5` sleeps 5 s mid-allocation; points: allocate, init_server). Test builds only:
/// without the `test-hooks` feature there is no pause, whatever the environment says.
#[cfg(feature = "test-hooks")]
fn pause_secs(point: &str, setting: Option<&str>) -> Option<u64> {
    let (p, secs) = setting?.split_once(':')?;
    if p == point { secs.parse().ok() } else { None }
}

#[cfg(not(feature = "test-hooks"))]
fn pause_secs(_point: &str, _setting: Option<&str>) -> Option<u64> {
    None
}

/// A crash window for the tests: sleeps at `point` when `KLOIGOS_TEST_PAUSE` names it. The
/// variable is read only in builds with the `test-hooks` feature (the release binary has not
/// even the name).
fn test_pause(point: &str) {
    #[cfg(feature = "test-hooks")]
    let setting = std::env::var("KLOIGOS_TEST_PAUSE").ok();
    #[cfg(not(feature = "test-hooks"))]
    let setting: Option<String> = None;
    if let Some(secs) = pause_secs(point, setting.as_deref()) {
        warn!(point, secs, "test pause point");
        std::thread::sleep(Duration::from_secs(secs));
    }
}

impl Kloigos {
    pub fn open(cfg: &Config) -> Result<Kloigos> {
        let store = Store::open(&cfg.db)?;
        let host = Host::new(&cfg.root);
        let renderer = Renderer::load(&cfg.templates)?;
        let local = cfg
            .hostname
            .clone()
            .unwrap_or_else(|| local_hostname(&cfg.root, host.is_live()));
        let mut lock_path = cfg.db.clone().into_os_string();
        lock_path.push(".lock");
        let facts = HostFacts {
            hostname: local.clone(),
            socket_bind: host.socket_bind_supported(),
        };
        Ok(Kloigos {
            store,
            host,
            renderer,
            local,
            lock_path: lock_path.into(),
            kill_grace: cfg.kill_grace,
            facts,
        })
    }

    pub fn local_hostname(&self) -> &str {
        &self.local
    }

    /// Overrides the detected `socket_bind` host fact (whether systemd enforces
    /// `SocketBindAllow=`), e.g. for a fake root standing in for a host with BPF.
    pub fn set_socket_bind(&mut self, on: bool) {
        self.facts.socket_bind = on;
    }

    pub fn host(&self) -> &Host {
        &self.host
    }

    fn lock(&self) -> Result<nix::fcntl::Flock<File>> {
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&self.lock_path)
            .map_err(|source| OpError::Lock {
                path: self.lock_path.clone(),
                source,
            })?;
        nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| {
            OpError::Lock {
                path: self.lock_path.clone(),
                source: e.into(),
            }
        })
    }

    fn is_local(&self, hostname: &str) -> bool {
        hostname == self.local
    }

    fn plan(&self, server: &Server, unit: &Unit) -> Result<UnitPlan> {
        let topology = model::numa::topology(self.host.root());
        Ok(UnitPlan::new(server, unit, &topology)?)
    }

    #[allow(clippy::too_many_arguments)] // mirrors NewEvent, with the error logged here
    pub(crate) fn record(
        &self,
        actor: &str,
        operation: &str,
        compute_id: Option<&str>,
        hostname: Option<&str>,
        result: std::result::Result<(), &str>,
        before: Option<Value>,
        after: Option<Value>,
    ) {
        if let Err(e) = self.store.record(NewEvent {
            actor,
            operation,
            compute_id,
            hostname,
            result,
            before,
            after,
        }) {
            error!(operation, error = %e, "cannot write the audit log");
        }
    }

    /// The end of the skeleton allocate, deallocate and decommission share. They take the
    /// host lock and record their intent in the store (`ALLOCATING`, `DEALLOCATING`,
    /// `DECOMMISSIONING`), apply it to the host, then come here with the result: `done`
    /// records the outcome of a success, `failed` rolls back or marks the failure and says
    /// why; either way the operation is logged and audited once.
    fn conclude<T>(
        &self,
        op: Op<'_>,
        applied: Result<()>,
        done: impl FnOnce() -> Result<(T, Option<Value>)>,
        failed: impl FnOnce(&OpError) -> Result<(String, Option<Value>)>,
    ) -> Result<T> {
        let Op {
            actor,
            operation,
            compute_id,
            hostname,
            before,
        } = op;
        match applied {
            Ok(()) => {
                let (value, after) = done()?;
                info!(compute_id, hostname, operation, actor, "done");
                self.record(
                    actor,
                    operation,
                    compute_id,
                    Some(hostname),
                    Ok(()),
                    before,
                    after,
                );
                Ok(value)
            }
            Err(e) => {
                error!(compute_id, hostname, operation, error = %e, "failed on the host");
                let (msg, after) = failed(&e)?;
                self.record(
                    actor,
                    operation,
                    compute_id,
                    Some(hostname),
                    Err(&msg),
                    before,
                    after,
                );
                Err(OpError::Failed(msg))
            }
        }
    }

    // ---- reads -------------------------------------------------------------------------

    pub fn units(&self, f: &UnitFilter) -> Result<Vec<Unit>> {
        Ok(self.store.units(f)?)
    }

    pub fn unit(&self, id: &str) -> Result<Unit> {
        self.store
            .unit(id)?
            .ok_or_else(|| OpError::NotFound(format!("compute unit {id:?} not found")))
    }

    pub fn servers(&self) -> Result<Vec<Server>> {
        Ok(self.store.servers()?)
    }

    pub fn events(&self, f: &EventFilter) -> Result<Vec<Event>> {
        Ok(self.store.events(f)?)
    }

    // ---- init_server -------------------------------------------------------------------

    /// Plans the units of a server: names, UIDs, ports; rejects overlaps, missing CPUs,
    /// ports beyond the ephemeral range and user names that would be too long.
    fn plan_server(&self, req: &InitServer) -> Result<Vec<NewUnit>> {
        let mut errors = Vec::new();
        let loc = |i: usize| vec![json!("body"), json!("cpu_ranges"), json!(i)];
        let local = self.is_local(&req.hostname);
        let online = if local {
            model::numa::online_cpus(self.host.root())
        } else {
            None
        };
        let ephemeral = if local {
            model::ports::ephemeral_range(self.host.root()).map(|(lo, _)| lo)
        } else {
            None
        };
        let mut units = Vec::new();
        for (i, cpus) in req.cpu_ranges.iter().enumerate() {
            let input = json!(cpus.to_string());
            for (j, other) in req.cpu_ranges.iter().enumerate().take(i) {
                if cpus.overlaps(other) {
                    errors.push(FieldError::value(
                        loc(i),
                        input.clone(),
                        format!("CPU range {cpus} overlaps cpu_ranges[{j}] ({other})"),
                    ));
                }
            }
            if let Some(online) = &online {
                let missing = cpus.difference(online);
                if !missing.is_empty() {
                    errors.push(FieldError::value(
                        loc(i),
                        input.clone(),
                        format!(
                            "host {} has no CPU {:?} (online CPUs: {online})",
                            req.hostname, missing
                        ),
                    ));
                }
            }
            let user = match names::user_name(cpus) {
                Ok(u) => u,
                Err(e) => {
                    errors.push(FieldError::value(loc(i), input.clone(), e.to_string()));
                    continue;
                }
            };
            let ports = match req.ports.ranges_for(cpus, ephemeral) {
                Ok(p) => p,
                Err(e) => {
                    errors.push(FieldError::value(loc(i), input.clone(), e.to_string()));
                    continue;
                }
            };
            let uid = names::uid(req.uid_base, cpus);
            if u64::from(req.uid_base) + u64::from(cpus.first()) > 2_000_000_000 {
                errors.push(FieldError::value(loc(i), input, "uid out of range"));
                continue;
            }
            units.push(NewUnit {
                compute_id: names::compute_id(&req.hostname, cpus),
                cpu_range: cpus.to_string(),
                cpu_count: cpus.len() as u32,
                first_cpu: cpus.first(),
                uid,
                user,
                ports_range: ports.to_string(),
            });
        }
        if errors.is_empty() {
            Ok(units)
        } else {
            Err(OpError::Invalid(errors))
        }
    }

    pub fn init_server(&self, req: InitServer, actor: &str) -> Result<()> {
        let _lock = self.lock()?;
        let units = self.plan_server(&req)?;
        // A unit's SSH logins must land in its slice, or they escape the CPU fence (doctor.rs).
        if self.host.is_live() && self.is_local(&req.hostname) {
            let sshd_t = crate::doctor::sshd_effective_config();
            let problems = crate::doctor::ssh_problems(self.host.root(), sshd_t.as_deref());
            if !problems.is_empty() {
                return Err(OpError::Conflict(format!(
                    "refusing init_server for {}: SSH logins of unit users would not land in \
                     their slice on this host ({}); see `kloigos doctor`",
                    req.hostname,
                    problems.join("; ")
                )));
            }
        }
        let now = crate::time::now();
        let server = Server {
            hostname: req.hostname.clone(),
            ip: req.ip.clone(),
            region: req.region.clone(),
            zone: req.zone.clone(),
            status: ServerStatus::Initializing,
            cpu_ranges: req.cpu_ranges.iter().map(|c| c.to_string()).collect(),
            port_base: req.ports.base,
            ports_per_cpu: req.ports.per_cpu,
            uid_base: req.uid_base,
            limits: req.limits.clone(),
            created_at: now.clone(),
            updated_at: now,
        };
        let host = Some(req.hostname.as_str());
        if let Err(status) = self.store.begin_init(&server, &units)? {
            return Err(OpError::Conflict(format!(
                "server {} is already known ({status}); decommission it first",
                req.hostname
            )));
        }
        test_pause("init_server");
        let after = json!({"hostname": server.hostname, "cpu_ranges": server.cpu_ranges});
        if self.is_local(&req.hostname) {
            info!(hostname = %req.hostname, operation = "init_server", units = units.len(), "applying");
            if let Err(e) = self.apply_local(None).and_then(all_ok) {
                error!(hostname = %req.hostname, operation = "init_server", error = %e, "init failed, rolling back");
                let detail = format!("init_server failed on the host: {e}");
                let rolled_back = self.rollback_init(&server);
                match rolled_back {
                    Ok(()) => self.store.delete_server(&req.hostname)?,
                    Err(ref re) => {
                        error!(hostname = %req.hostname, error = %re, "rollback failed");
                        self.store.set_server_status(
                            &req.hostname,
                            ServerStatus::InitFail,
                            Some(UnitStatus::Unavailable),
                        )?;
                    }
                }
                self.record(
                    actor,
                    "init_server",
                    None,
                    host,
                    Err(&detail),
                    None,
                    Some(after),
                );
                return Err(OpError::Failed(match rolled_back {
                    Ok(()) => format!("{detail} (rolled back)"),
                    Err(re) => format!(
                        "{detail}; rollback failed too: {re} (server is INIT_FAIL; retry init_server or run reconcile)"
                    ),
                }));
            }
        }
        self.store
            .set_server_status(&req.hostname, ServerStatus::Ready, Some(UnitStatus::Free))?;
        info!(hostname = %req.hostname, operation = "init_server", "server ready");
        self.record(actor, "init_server", None, host, Ok(()), None, Some(after));
        Ok(())
    }

    /// Removes what a failed init created for `server`, leaving the other units as they are.
    fn rollback_init(&self, server: &Server) -> Result<()> {
        let units = self.store.units_of(&server.hostname)?;
        let plans = units
            .iter()
            .map(|u| self.plan(server, u))
            .collect::<Result<Vec<_>>>()?;
        self.host.teardown(&plans, self.kill_grace)?;
        self.host.purge_trash();
        all_ok(self.apply_local(Some(&server.hostname))?)
    }

    /// The inventory rows of this host's servers, optionally leaving out one server, and with
    /// the unit `released` seen as FREE (its release is under way).
    fn rows(
        &self,
        except: Option<&str>,
        released: Option<&str>,
    ) -> Result<Vec<(Server, Vec<Unit>)>> {
        let mut rows = Vec::new();
        for server in self.store.servers()? {
            if !plan::is_planned(&server, &self.local) || Some(server.hostname.as_str()) == except {
                continue;
            }
            let mut units = self.store.units_of(&server.hostname)?;
            for u in &mut units {
                if Some(u.compute_id.as_str()) == released {
                    u.status = UnitStatus::Free;
                }
            }
            rows.push((server, units));
        }
        Ok(rows)
    }

    /// The desired state of this host (see `plan::desired`).
    fn desired(&self, except: Option<&str>, released: Option<&str>) -> Result<Desired> {
        let topology = model::numa::topology(self.host.root());
        let rows = self.rows(except, released)?;
        Ok(plan::desired(
            &self.renderer,
            &self.facts,
            &topology,
            &rows,
        )?)
    }

    /// Brings the host in line with the inventory's local units (optionally leaving out one
    /// server's): users, state file and generator drop-ins, tmpfiles.d, directories, the
    /// nftables table. One broken unit does not stop the others: it is in `failed`.
    fn apply_local(&self, except: Option<&str>) -> Result<ApplyReport> {
        Ok(converge(
            &self.host,
            &self.desired(except, None)?,
            Scope::Full,
        )?)
    }

    /// Every file Kloigos would write for the local units, for `kloigos render`: the state
    /// file, the drop-ins the generator makes of it (under `run/systemd/generator`), the
    /// tmpfiles.d files and the nftables table.
    pub fn render_all(&self) -> Result<Vec<RenderedFile>> {
        let d = self.desired(None, None)?;
        let mut files: Vec<RenderedFile> = d.state_file.into_iter().collect();
        files.extend(d.dropins.into_iter().map(|mut f| {
            f.path = std::path::Path::new(plan::GENERATOR_DIR).join(&f.path);
            f
        }));
        files.extend(d.tmpfiles);
        files.extend(d.nft);
        Ok(files)
    }

    pub fn template_sources(&self) -> &[(String, String)] {
        &self.renderer.sources
    }
}

#[cfg(test)]
mod tests {
    use super::pause_secs;

    #[cfg(not(feature = "test-hooks"))]
    #[test]
    fn without_test_hooks_the_pause_setting_is_ignored() {
        assert_eq!(pause_secs("allocate", Some("allocate:5")), None);
        assert_eq!(pause_secs("init_server", Some("init_server:30")), None);
    }

    #[cfg(feature = "test-hooks")]
    #[test]
    fn with_test_hooks_the_pause_setting_names_a_point() {
        assert_eq!(pause_secs("allocate", Some("allocate:5")), Some(5));
        assert_eq!(pause_secs("init_server", Some("allocate:5")), None);
        assert_eq!(pause_secs("allocate", Some("allocate:x")), None);
        assert_eq!(pause_secs("allocate", Some("allocate")), None);
        assert_eq!(pause_secs("allocate", None), None);
    }
}
