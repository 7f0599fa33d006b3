//! The operations of Kloigos: init_server, allocate, deallocate, decommission and reconcile.
//! Each one validates, records its intent in the store, applies it to the host through
//! `apply::Host`, then records the outcome, so a crash at any point leaves a state that
//! `reconcile` finishes or rolls back. Host-changing operations hold an exclusive file lock, so
//! the service and a `kloigos reconcile` run by hand never interleave.

use crate::apply::{ApplyError, Host};
use crate::model::{self, CpuList, PortPlan, names, validate::SshKey};
use crate::render::{self, HostFacts, RenderError, Renderer, UnitPlan};
use crate::store::{
    Event, EventFilter, Inventory, Limits, NewEvent, NewUnit, Server, ServerStatus, Store,
    StoreError, Transition, Unit, UnitChange, UnitFilter, UnitStatus,
};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tracing::{error, info, warn};

/// One step of the path to an invalid part of a request: a field or a list index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocPart {
    Field(&'static str),
    Index(usize),
}

/// One semantic problem with a request: where (`cpu_ranges[2]`), the offending input as the
/// caller gave it, and why. The API turns these into FastAPI's 422 `loc` lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub loc: Vec<LocPart>,
    pub input: String,
    pub reason: String,
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, part) in self.loc.iter().enumerate() {
            match part {
                LocPart::Field(name) if i == 0 => f.write_str(name)?,
                LocPart::Field(name) => write!(f, ".{name}")?,
                LocPart::Index(n) => write!(f, "[{n}]")?,
            }
        }
        write!(f, " ({:?}): {}", self.input, self.reason)
    }
}

/// The problems of a request, all of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidList(pub Vec<Invalid>);

impl std::fmt::Display for InvalidList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("invalid request")?;
        for (i, e) in self.0.iter().enumerate() {
            f.write_str(if i == 0 { ": " } else { "; " })?;
            e.fmt(f)?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("{0}")]
    Invalid(InvalidList),
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
    #[error("lock {}", path.display())]
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

/// What `apply_local` did.
struct Applied {
    written: Vec<String>,
    removed: Vec<String>,
    /// Units it could not set up: (compute_id, why).
    failed: Vec<(String, String)>,
}

impl Applied {
    /// All or nothing, for operations that must set up every unit (init_server, decommission).
    fn all_ok(self) -> Result<()> {
        if self.failed.is_empty() {
            Ok(())
        } else {
            let msgs: Vec<String> = self
                .failed
                .iter()
                .map(|(id, e)| format!("{id}: {e}"))
                .collect();
            Err(OpError::Failed(msgs.join("; ")))
        }
    }
}

pub struct Kloigos {
    pub store: Box<dyn Inventory>,
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
        let store = Box::new(Store::open(&cfg.db)?);
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
        Ok(UnitPlan::new(server, unit, self.host.root())?)
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
        let invalid = |i: usize, input: &str, reason: String| Invalid {
            loc: vec![LocPart::Field("cpu_ranges"), LocPart::Index(i)],
            input: input.to_string(),
            reason,
        };
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
            let input = cpus.to_string();
            for (j, other) in req.cpu_ranges.iter().enumerate().take(i) {
                if cpus.overlaps(other) {
                    errors.push(invalid(
                        i,
                        &input,
                        format!("CPU range {cpus} overlaps cpu_ranges[{j}] ({other})"),
                    ));
                }
            }
            if let Some(online) = &online {
                let missing = cpus.difference(online);
                if !missing.is_empty() {
                    errors.push(invalid(
                        i,
                        &input,
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
                    errors.push(invalid(i, &input, e.to_string()));
                    continue;
                }
            };
            let ports = match req.ports.ranges_for(cpus, ephemeral) {
                Ok(p) => p,
                Err(e) => {
                    errors.push(invalid(i, &input, e.to_string()));
                    continue;
                }
            };
            let uid = names::uid(req.uid_base, cpus);
            if u64::from(req.uid_base) + u64::from(cpus.first()) > 2_000_000_000 {
                errors.push(invalid(i, &input, "uid out of range".into()));
                continue;
            }
            units.push(NewUnit {
                compute_id: names::compute_id(&req.hostname, cpus),
                cpu_range: cpus.clone(),
                cpu_count: cpus.len() as u32,
                first_cpu: cpus.first(),
                uid,
                user,
                ports_range: ports,
            });
        }
        if errors.is_empty() {
            Ok(units)
        } else {
            Err(OpError::Invalid(InvalidList(errors)))
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
            cpu_ranges: req.cpu_ranges.clone(),
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
            if let Err(e) = self.apply_local(None).and_then(Applied::all_ok) {
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
        self.remove_units_from_host(&plans)?;
        self.host.purge_trash();
        self.apply_local(Some(&server.hostname))?.all_ok()
    }

    /// Every local unit's plan, optionally leaving out one server's.
    fn local_plans(&self, except: Option<&str>) -> Result<Vec<(Server, Unit, UnitPlan)>> {
        let mut out = Vec::new();
        for server in self.store.servers()? {
            if !self.is_local(&server.hostname) || Some(server.hostname.as_str()) == except {
                continue;
            }
            if matches!(
                server.status,
                ServerStatus::Decommissioned | ServerStatus::InitFail
            ) {
                continue;
            }
            for unit in self.store.units_of(&server.hostname)? {
                let plan = self.plan(&server, &unit)?;
                out.push((server.clone(), unit, plan));
            }
        }
        Ok(out)
    }

    /// Brings the host in line with the inventory's local units: users, unit files
    /// (daemon-reload only when one changed), directories, the nftables table; removes Kloigos
    /// files no unit claims. Returns the paths written and removed, and the units whose user
    /// or directories could not be made (`compute_id`, why): one broken unit does not stop
    /// the others.
    fn apply_local(&self, except: Option<&str>) -> Result<Applied> {
        let plans = self.local_plans(except)?;
        let mut written = Vec::new();
        let mut failed: Vec<(String, String)> = Vec::new();
        for (_, _, p) in &plans {
            if let Err(e) = self.host.ensure_user(p) {
                failed.push((p.compute_id.clone(), e.to_string()));
            }
        }
        for (_, _, p) in &plans {
            for f in self.renderer.unit_files(&self.facts, p)? {
                if self.host.write(&f, None)? {
                    written.push(f.path.display().to_string());
                }
            }
        }
        let owned =
            render::owned_paths(&plans.iter().map(|(_, _, p)| p.clone()).collect::<Vec<_>>());
        let removed = self.remove_stale_files(&owned)?;
        if written.iter().any(|p| p.starts_with("etc/systemd"))
            || removed.iter().any(|p| p.starts_with("etc/systemd"))
        {
            self.host.daemon_reload()?;
        }
        for (_, _, p) in &plans {
            if failed.iter().any(|(id, _)| *id == p.compute_id) {
                continue;
            }
            // Its owner's process answers (or never answers) every access below a FUSE mount:
            // the unit is left alone and reported, the host lock is not held up.
            if let Some(m) = self.host.fuse_mount_in(p) {
                failed.push((
                    p.compute_id.clone(),
                    format!("{m:?} is a FUSE mount: an admin must unmount it"),
                ));
                continue;
            }
            if let Err(e) = self.host.create_dirs(p) {
                failed.push((p.compute_id.clone(), e.to_string()));
            }
        }
        let all: Vec<UnitPlan> = plans.into_iter().map(|(_, _, p)| p).collect();
        if all.is_empty() {
            if self.host.path(render::NFT_PATH).exists() || self.host.nft_loaded() == Some(true) {
                self.host.remove_nft(Path::new(render::NFT_PATH))?;
                written.push(format!("{} (removed)", render::NFT_PATH));
            }
        } else {
            let nft = self.renderer.nftables(&self.facts, &all)?;
            let changed = self.host.write(&nft, None)?;
            if changed || self.host.nft_loaded() == Some(false) {
                self.host.load_nft(&nft)?;
            }
            if changed {
                written.push(nft.path.display().to_string());
            }
        }
        Ok(Applied {
            written,
            removed,
            failed,
        })
    }

    /// Removes drop-ins and tmpfiles.d files that Kloigos wrote for units no longer in `owned`.
    fn remove_stale_files(&self, owned: &BTreeSet<PathBuf>) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        let mut candidates = Vec::new();
        let sysd = self.host.path("etc/systemd/system");
        if let Ok(entries) = std::fs::read_dir(&sysd) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let is_ours = (name.starts_with("user-") && name.ends_with(".slice.d"))
                    || (name.starts_with("user@") && name.ends_with(".service.d"));
                if is_ours {
                    candidates.push(PathBuf::from(format!(
                        "etc/systemd/system/{name}/50-kloigos.conf"
                    )));
                }
            }
        }
        if let Ok(entries) = std::fs::read_dir(self.host.path("etc/tmpfiles.d")) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with("kloigos-") && name.ends_with(".conf") {
                    candidates.push(PathBuf::from(format!("etc/tmpfiles.d/{name}")));
                }
            }
        }
        for c in candidates {
            if !owned.contains(&c) && self.host.remove(&c)? {
                if let Some(parent) = c.parent().filter(|p| p.starts_with("etc/systemd/system/")) {
                    self.host.remove_empty_dir(parent);
                }
                removed.push(c.display().to_string());
            }
        }
        Ok(removed)
    }

    /// Takes units off the host entirely: processes, files, directories, users.
    fn remove_units_from_host(&self, plans: &[UnitPlan]) -> Result<()> {
        let mut errors = Vec::new();
        for p in plans {
            // Keep going after an error: a half-removed unit is reported, not hidden.
            let r = (|| -> Result<()> {
                self.host.remove(p.tmpfiles_conf())?;
                self.end_ownership(p)?;
                for f in [p.slice_dropin(), p.user_service_dropin()] {
                    self.host.remove(&f)?;
                    if let Some(parent) =
                        f.parent().filter(|d| d.starts_with("etc/systemd/system/"))
                    {
                        self.host.remove_empty_dir(parent);
                    }
                }
                self.host.remove_dirs(p)?;
                self.host.remove_user(&p.user)?;
                Ok(())
            })();
            if let Err(e) = r {
                errors.push(format!("{}: {e}", p.compute_id));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(OpError::Failed(errors.join("; ")))
        }
    }

    // ---- allocate ----------------------------------------------------------------------

    /// Allocates a FREE unit; what a failed allocation's release moved aside is removed after
    /// the host lock is released.
    pub fn allocate(&self, req: Allocate, actor: &str) -> Result<Unit> {
        let r = self.allocate_locked(req, actor);
        self.host.purge_trash();
        r
    }

    fn allocate_locked(&self, req: Allocate, actor: &str) -> Result<Unit> {
        let _lock = self.lock()?;
        let key = req.ssh_key.to_line();
        let Some(unit) = self.store.claim_free(
            req.cpu_count,
            req.region.as_deref(),
            req.zone.as_deref(),
            req.tags.as_ref(),
            &key,
            actor,
        )?
        else {
            let mut what = format!("cpu_count={}", req.cpu_count);
            if let Some(r) = &req.region {
                what.push_str(&format!(", region={r}"));
            }
            if let Some(z) = &req.zone {
                what.push_str(&format!(", zone={z}"));
            }
            return Err(OpError::Conflict(format!(
                "no FREE compute unit matches {what}"
            )));
        };
        let id = unit.compute_id.clone();
        info!(compute_id = %id, operation = "allocate", actor, "allocating");
        let applied = if self.is_local(&unit.hostname) {
            self.apply_allocate(&unit, &key)
        } else {
            Ok(())
        };
        match applied {
            Ok(()) => {
                let Transition::Done(done) = self.store.transition(
                    &id,
                    &[UnitStatus::Allocating],
                    UnitStatus::Allocated,
                    UnitChange {
                        started_at: Some(Some(crate::time::now())),
                        ..Default::default()
                    },
                )?
                else {
                    return Err(OpError::Failed(format!("{id} changed state under us")));
                };
                info!(compute_id = %id, operation = "allocate", actor, "allocated");
                let done = *done;
                self.record(
                    actor,
                    "allocate",
                    Some(&id),
                    Some(&done.hostname),
                    Ok(()),
                    Some(json!({"status": "FREE"})),
                    Some(unit_json(&done)),
                );
                Ok(done)
            }
            Err(e) => {
                error!(compute_id = %id, operation = "allocate", error = %e, "allocation failed, rolling back");
                let detail = format!("allocation of {id} failed on the host: {e}");
                let server = self.store.server(&unit.hostname)?;
                let rollback = match &server {
                    Some(s) => self.plan(s, &unit).and_then(|p| self.release(&p)),
                    None => Err(OpError::NotFound(unit.hostname.clone())),
                };
                let (to, change, msg) = match &rollback {
                    Ok(()) => (
                        UnitStatus::Free,
                        UnitChange::cleared(),
                        format!("{detail} (rolled back)"),
                    ),
                    Err(re) => (
                        UnitStatus::AllocationFail,
                        UnitChange::default(),
                        format!(
                            "{detail}; rollback failed: {re} (unit is ALLOCATION_FAIL; deallocate or reconcile cleans it)"
                        ),
                    ),
                };
                let after =
                    match self
                        .store
                        .transition(&id, &[UnitStatus::Allocating], to, change)?
                    {
                        Transition::Done(u) => Some(unit_json(&u)),
                        _ => None,
                    };
                self.record(
                    actor,
                    "allocate",
                    Some(&id),
                    Some(&unit.hostname),
                    Err(&msg),
                    Some(json!({"status": "FREE"})),
                    after,
                );
                Err(OpError::Failed(msg))
            }
        }
    }

    fn apply_allocate(&self, unit: &Unit, key: &str) -> Result<()> {
        let server = self
            .store
            .server(&unit.hostname)?
            .ok_or_else(|| OpError::NotFound(unit.hostname.clone()))?;
        let plan = self.plan(&server, unit)?;
        self.host.write_authorized_key(&plan, key)?;
        test_pause("allocate");
        // tmpfiles.d now carries the linger flag; no daemon-reload is needed for that.
        self.host
            .write(&self.renderer.tmpfiles(&self.facts, &plan)?, None)?;
        self.host.set_linger(&plan, true)?;
        Ok(())
    }

    /// Host side of "nobody owns this unit": linger off, every process gone, key removed,
    /// leftovers removed, directories back to the skeleton (filled from /etc/skel only now,
    /// after the kill), tmpfiles.d without linger.
    fn release(&self, plan: &UnitPlan) -> Result<()> {
        let mut plan = plan.clone();
        plan.allocated = false;
        // tmpfiles.d without the linger flag first: recreating the skeleton below runs
        // systemd-tmpfiles on that file, which would otherwise bring the flag back.
        self.host
            .write(&self.renderer.tmpfiles(&self.facts, &plan)?, None)?;
        self.end_ownership(&plan)?;
        self.host.wipe_dirs(&plan)?;
        // A login that raced the key removal is gone with this second pass.
        self.host.kill_user(&plan, Duration::ZERO)?;
        Ok(())
    }

    /// No lingering, then no processes, and only then (nobody left to race the removal) the
    /// key and what the owner left outside its directories. A login that slipped in before
    /// the key went is ended by `release`'s second kill.
    fn end_ownership(&self, plan: &UnitPlan) -> Result<()> {
        self.host.set_linger(plan, false)?;
        self.host.kill_user(plan, self.kill_grace)?;
        self.host.remove_authorized_key(plan)?;
        self.host.remove_user_leftovers(plan)?;
        Ok(())
    }

    // ---- deallocate --------------------------------------------------------------------

    /// `check` may refuse (e.g. a user deallocating someone else's unit) after the unit is found.
    /// The files the owner left are removed after the host lock is released: however many
    /// there are, they hold up no one else's operation.
    pub fn deallocate(
        &self,
        id: &str,
        actor: &str,
        check: &dyn Fn(&Unit) -> Result<()>,
    ) -> Result<()> {
        let r = self.deallocate_locked(id, actor, check);
        self.host.purge_trash();
        r
    }

    fn deallocate_locked(
        &self,
        id: &str,
        actor: &str,
        check: &dyn Fn(&Unit) -> Result<()>,
    ) -> Result<()> {
        let _lock = self.lock()?;
        let before = self.unit(id)?;
        check(&before)?;
        let from = [
            UnitStatus::Allocated,
            UnitStatus::AllocationFail,
            UnitStatus::DeallocationFail,
        ];
        let unit = match self.store.transition(
            id,
            &from,
            UnitStatus::Deallocating,
            UnitChange::default(),
        )? {
            Transition::Done(u) => *u,
            Transition::NotFound => {
                return Err(OpError::NotFound(format!("compute unit {id:?} not found")));
            }
            Transition::WrongState(s) => {
                return Err(OpError::Conflict(format!(
                    "compute unit {id} is {s}; only ALLOCATED, ALLOCATION_FAIL or DEALLOCATION_FAIL units can be deallocated"
                )));
            }
        };
        info!(compute_id = %id, operation = "deallocate", actor, "deallocating");
        let applied = if self.is_local(&unit.hostname) {
            self.store
                .server(&unit.hostname)?
                .ok_or_else(|| OpError::NotFound(unit.hostname.clone()))
                .and_then(|s| self.plan(&s, &unit))
                .and_then(|p| self.release(&p))
        } else {
            Ok(())
        };
        match applied {
            Ok(()) => {
                let after = match self.store.transition(
                    id,
                    &[UnitStatus::Deallocating],
                    UnitStatus::Free,
                    UnitChange::cleared(),
                )? {
                    Transition::Done(u) => *u,
                    _ => return Err(OpError::Failed(format!("{id} changed state under us"))),
                };
                info!(compute_id = %id, operation = "deallocate", actor, "deallocated");
                self.record(
                    actor,
                    "deallocate",
                    Some(id),
                    Some(&unit.hostname),
                    Ok(()),
                    Some(unit_json(&before)),
                    Some(unit_json(&after)),
                );
                Ok(())
            }
            Err(e) => {
                error!(compute_id = %id, operation = "deallocate", error = %e, "deallocation failed");
                let msg = format!(
                    "deallocation of {id} failed on the host: {e} (unit is DEALLOCATION_FAIL; retry deallocate)"
                );
                let after = match self.store.transition(
                    id,
                    &[UnitStatus::Deallocating],
                    UnitStatus::DeallocationFail,
                    UnitChange::default(),
                )? {
                    Transition::Done(u) => Some(unit_json(&u)),
                    _ => None,
                };
                self.record(
                    actor,
                    "deallocate",
                    Some(id),
                    Some(&unit.hostname),
                    Err(&msg),
                    Some(unit_json(&before)),
                    after,
                );
                Err(OpError::Failed(msg))
            }
        }
    }

    // ---- decommission ------------------------------------------------------------------

    /// Retires a server; its units' files are removed after the host lock is released.
    pub fn decommission(&self, hostname: &str, force: bool, actor: &str) -> Result<()> {
        let r = self.decommission_locked(hostname, force, actor);
        self.host.purge_trash();
        r
    }

    fn decommission_locked(&self, hostname: &str, force: bool, actor: &str) -> Result<()> {
        let _lock = self.lock()?;
        let server = self
            .store
            .server(hostname)?
            .ok_or_else(|| OpError::NotFound(format!("server {hostname:?} not found")))?;
        if server.status == ServerStatus::Decommissioned {
            return Err(OpError::Conflict(format!(
                "server {hostname} is already DECOMMISSIONED"
            )));
        }
        let units = self.store.units_of(hostname)?;
        let busy: Vec<&str> = units
            .iter()
            .filter(|u| !matches!(u.status, UnitStatus::Free | UnitStatus::Unavailable))
            .map(|u| u.compute_id.as_str())
            .collect();
        if !busy.is_empty() && !force {
            return Err(OpError::Conflict(format!(
                "server {hostname} still has units in use: {}; deallocate them or pass force=true",
                busy.join(", ")
            )));
        }
        self.store
            .set_server_status(hostname, ServerStatus::Decommissioning, None)?;
        info!(
            hostname,
            operation = "decommission_server",
            actor,
            force,
            "decommissioning"
        );
        match self.finish_decommission(&server, &units) {
            Ok(()) => {
                self.record(
                    actor,
                    "decommission_server",
                    None,
                    Some(hostname),
                    Ok(()),
                    Some(json!({"status": server.status, "units_in_use": busy})),
                    Some(json!({"status": "DECOMMISSIONED"})),
                );
                Ok(())
            }
            Err(e) => {
                let msg = format!(
                    "decommission of {hostname} failed on the host: {e} (server is DECOMMISSION_FAIL; retry)"
                );
                error!(hostname, operation = "decommission_server", error = %e, "failed");
                self.store
                    .set_server_status(hostname, ServerStatus::DecommissionFail, None)?;
                self.record(
                    actor,
                    "decommission_server",
                    None,
                    Some(hostname),
                    Err(&msg),
                    Some(json!({"status": server.status})),
                    Some(json!({"status": "DECOMMISSION_FAIL"})),
                );
                Err(OpError::Failed(msg))
            }
        }
    }

    fn finish_decommission(&self, server: &Server, units: &[Unit]) -> Result<()> {
        if self.is_local(&server.hostname) {
            let plans = units
                .iter()
                .map(|u| self.plan(server, u))
                .collect::<Result<Vec<_>>>()?;
            self.remove_units_from_host(&plans)?;
            self.apply_local(Some(&server.hostname))?.all_ok()?;
        }
        self.store
            .retire_server(&server.hostname, ServerStatus::Decommissioned)?;
        Ok(())
    }

    // ---- reconcile ---------------------------------------------------------------------

    /// Re-renders everything from the inventory, finishes or rolls back what a crash left
    /// half-done, and repairs drift. Running it twice in a row changes nothing the second time.
    /// What it moves aside is removed after the host lock is released.
    pub fn reconcile(&self, actor: &str) -> Result<ReconcileReport> {
        let r = self.reconcile_locked(actor);
        self.host.purge_trash();
        r
    }

    fn reconcile_locked(&self, actor: &str) -> Result<ReconcileReport> {
        let _lock = self.lock()?;
        let mut report = ReconcileReport::default();
        // Servers half decommissioned: finish the job first, so their units are not re-rendered.
        for server in self.store.servers()? {
            if server.status == ServerStatus::Decommissioning {
                let units = self.store.units_of(&server.hostname)?;
                self.finish_decommission(&server, &units)?;
                self.server_fixed(
                    actor,
                    &mut report,
                    &server.hostname,
                    ServerStatus::Decommissioning,
                    ServerStatus::Decommissioned,
                );
            }
        }
        // What a run stopped before removing it: for `purge_trash`, after the lock.
        let plans = self.local_plans(None)?;
        if let Err(e) = self.host.find_trash(plans.iter().map(|(_, _, p)| p)) {
            error!(error = %e, "cannot look for old files to remove");
        }
        // Every file, user, directory and the table as the inventory says...
        let applied = self.apply_local(None)?;
        report.files_changed.extend(applied.written);
        report.files_removed.extend(applied.removed);
        let setup_failed: std::collections::BTreeMap<String, String> =
            applied.failed.into_iter().collect();
        // ...then each unit's ownership: keys, lingering, operations a crash cut short.
        for server in self.store.servers()? {
            if !matches!(
                server.status,
                ServerStatus::Initializing | ServerStatus::Ready
            ) {
                continue;
            }
            let units = self.store.units_of(&server.hostname)?;
            for unit in &units {
                // One unit that cannot be repaired (a wrecked home, say) is marked, reported
                // and audited; the others are still reconciled and the service still serves.
                let r = match setup_failed.get(&unit.compute_id) {
                    Some(e) => Err(OpError::Failed(e.clone())),
                    None => self.reconcile_unit(&server, unit, actor, &mut report),
                };
                self.unit_outcome(&server, unit, r, actor, &mut report)?;
            }
        }
        for server in self.store.servers()? {
            if server.status == ServerStatus::Initializing {
                self.store.set_server_status(
                    &server.hostname,
                    ServerStatus::Ready,
                    Some(UnitStatus::Free),
                )?;
                self.server_fixed(
                    actor,
                    &mut report,
                    &server.hostname,
                    ServerStatus::Initializing,
                    ServerStatus::Ready,
                );
            }
        }
        if !report.is_clean() {
            info!(operation = "reconcile", ?report, "reconciled");
        }
        Ok(report)
    }

    /// Marks (or clears the mark of) a unit after reconcile tried to repair it; a failure is
    /// reported every time, marked and audited once per distinct problem.
    fn unit_outcome(
        &self,
        server: &Server,
        unit: &Unit,
        outcome: Result<()>,
        actor: &str,
        report: &mut ReconcileReport,
    ) -> Result<()> {
        let id = unit.compute_id.as_str();
        match outcome {
            Ok(()) => {
                if unit.problem.is_some() {
                    self.store.set_problem(id, None)?;
                    report.units_fixed.push(format!("{id}: problem cleared"));
                }
            }
            Err(e) => {
                let msg = format!("reconcile could not repair {id}: {e}");
                error!(compute_id = %id, operation = "reconcile", error = %e, "unit left broken");
                report.units_failed.push(format!("{id}: {e}"));
                if unit.problem.as_deref() == Some(msg.as_str()) {
                    // Already marked and audited (a tenant restarting the service must not
                    // flood the audit log).
                    return Ok(());
                }
                self.store.set_problem(id, Some(&msg))?;
                self.record(
                    actor,
                    "reconcile",
                    Some(id),
                    Some(&server.hostname),
                    Err(&msg),
                    Some(unit_json(unit)),
                    None,
                );
            }
        }
        Ok(())
    }

    /// Reports and audits a server that reconcile moved from `from` to `to`.
    fn server_fixed(
        &self,
        actor: &str,
        report: &mut ReconcileReport,
        hostname: &str,
        from: ServerStatus,
        to: ServerStatus,
    ) {
        report
            .servers_fixed
            .push(format!("{hostname}: {from} -> {to}"));
        self.record(
            actor,
            "reconcile",
            None,
            Some(hostname),
            Ok(()),
            Some(json!({ "status": from })),
            Some(json!({ "status": to })),
        );
    }

    fn reconcile_unit(
        &self,
        server: &Server,
        unit: &Unit,
        actor: &str,
        report: &mut ReconcileReport,
    ) -> Result<()> {
        let local = self.is_local(&server.hostname);
        let plan = if local {
            Some(self.plan(server, unit)?)
        } else {
            None
        };
        let id = unit.compute_id.as_str();
        match unit.status {
            UnitStatus::Allocating
            | UnitStatus::AllocationFail
            | UnitStatus::Deallocating
            | UnitStatus::DeallocationFail => {
                if let Some(p) = &plan {
                    // Make sure the user and its files exist before cleaning up after it.
                    self.host.ensure_user(p)?;
                    self.release(p)?;
                }
                if let Transition::Done(after) = self.store.transition(
                    id,
                    &[unit.status],
                    UnitStatus::Free,
                    UnitChange::cleared(),
                )? {
                    report
                        .units_fixed
                        .push(format!("{id}: {} -> FREE", unit.status));
                    self.record(
                        actor,
                        "reconcile",
                        Some(id),
                        Some(&server.hostname),
                        Ok(()),
                        Some(unit_json(unit)),
                        Some(unit_json(&after)),
                    );
                }
            }
            UnitStatus::Allocated => {
                if let (Some(p), Some(key)) = (&plan, &unit.ssh_public_key)
                    && self.host.authorized_key(p).as_deref() != Some(key.as_str())
                {
                    self.host.ensure_user(p)?;
                    self.host.create_dirs(p)?;
                    self.host.write_authorized_key(p, key)?;
                    self.host.set_linger(p, true)?;
                    report
                        .units_fixed
                        .push(format!("{id}: authorized key restored"));
                }
                if let Some(p) = &plan {
                    if !self.host.path(p.linger_file()).exists() {
                        self.host.set_linger(p, true)?;
                        report.units_fixed.push(format!("{id}: linger restored"));
                    } else if self.host.is_live() {
                        // tmpfiles.d may have put the flag back without logind knowing:
                        // make sure the owner's user manager runs now, not at the next boot.
                        self.host.set_linger(p, true)?;
                    }
                }
            }
            UnitStatus::Free | UnitStatus::Unavailable => {
                if let Some(p) = &plan {
                    if self.host.authorized_key(p).is_some() {
                        self.host.remove_authorized_key(p)?;
                        report
                            .units_fixed
                            .push(format!("{id}: stray authorized key removed"));
                    }
                    if self.host.path(p.linger_file()).exists() {
                        self.host.set_linger(p, false)?;
                        report
                            .units_fixed
                            .push(format!("{id}: stray linger removed"));
                    }
                }
            }
        }
        Ok(())
    }

    /// Every file Kloigos would write for the local units, for `kloigos render`.
    pub fn render_all(&self) -> Result<Vec<render::RenderedFile>> {
        let plans = self.local_plans(None)?;
        let mut files = Vec::new();
        for (_, _, p) in &plans {
            files.extend(self.renderer.unit_files(&self.facts, p)?);
        }
        let all: Vec<UnitPlan> = plans.into_iter().map(|(_, _, p)| p).collect();
        if !all.is_empty() {
            files.push(self.renderer.nftables(&self.facts, &all)?);
        }
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
