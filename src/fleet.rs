//! The host side of the fleet (see README, "Fleet", and DESIGN.md, "Beyond one host"): the
//! wire formats a hub and a host exchange ([`Facts`], [`DesiredHostState`], [`Report`]), the
//! files a joined host keeps ([`JoinConfig`], the token), `join` and `pull` over HTTP, and the
//! [`Puller`] that coalesces pokes in `kloigos serve`.
//!
//! Applying a desired state is the service's job (`Kloigos::apply_desired`, in
//! `service/fleet.rs`); this module only fetches it and reports the outcome.

use crate::model::CpuList;
use crate::model::status::{Limits, ServerStatus, UnitStatus};
use crate::render::RenderedFile;
use crate::store::{Server, Unit};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where a joined host keeps its hubs (relative to `--root`).
pub const JOIN_PATH: &str = "etc/kloigos/join.json";
/// Where a joined host keeps its token (relative to `--root`, mode 0600).
pub const TOKEN_PATH: &str = "etc/kloigos/host-token";
/// The version a host reports.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// How long one request to a hub may take.
const HUB_TIMEOUT: Duration = Duration::from_secs(20);
/// The largest answer read from a hub.
const MAX_ANSWER: usize = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("{0}")]
    Usage(String),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: not the expected JSON")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("hub {hub}: {why}")]
    Hub { hub: String, why: String },
    #[error("no hub answered: {0}")]
    NoHub(String),
    #[error("applying the desired state")]
    Apply(#[source] crate::service::OpError),
    #[error("waiting for the pull in progress")]
    Lock(#[source] crate::service::OpError),
    #[error(transparent)]
    Write(#[from] crate::apply::ApplyError),
}

pub type Result<T> = std::result::Result<T, FleetError>;

// ---- wire formats ----------------------------------------------------------------------------

/// What a host reports about itself, all read under its `--root`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Facts {
    pub cpus_online: Option<String>,
    pub numa_nodes: Option<BTreeMap<String, String>>,
    pub ephemeral_ports: Option<[u16; 2]>,
    pub systemd_version: Option<u32>,
    pub socket_bind: bool,
    pub kloigos_version: String,
}

/// The first number of `systemctl --version`'s first line (`systemd 252 (252.22-1)`).
pub fn parse_systemd_version(out: &str) -> Option<u32> {
    out.lines().next()?.split_whitespace().nth(1)?.parse().ok()
}

impl Facts {
    /// The facts of the host under `root` (a fake root has no systemd version).
    pub fn gather(root: &Path) -> Facts {
        let host = crate::apply::Host::new(root);
        let topology = crate::model::numa::topology(root);
        let systemd_version = if host.is_live() {
            std::process::Command::new("systemctl")
                .arg("--version")
                .output()
                .ok()
                .and_then(|o| parse_systemd_version(&String::from_utf8_lossy(&o.stdout)))
        } else {
            None
        };
        Facts {
            cpus_online: crate::model::numa::online_cpus(root).map(|c| c.to_string()),
            numa_nodes: (!topology.is_empty()).then(|| {
                topology
                    .iter()
                    .map(|(n, c)| (n.to_string(), c.to_string()))
                    .collect()
            }),
            ephemeral_ports: crate::model::ports::ephemeral_range(root).map(|(a, b)| [a, b]),
            systemd_version,
            socket_bind: host.socket_bind_supported(),
            kloigos_version: VERSION.to_string(),
        }
    }
}

/// A unit as the hub sends it: the inventory's row, every field as serde serializes it.
pub type DesiredUnit = Unit;

impl Unit {
    /// Owned (ALLOCATING or ALLOCATED): the owner's claim and key.
    pub fn owner(&self) -> Option<(&str, &str)> {
        if matches!(self.status, UnitStatus::Allocating | UnitStatus::Allocated) {
            Some((
                self.claim.as_deref().unwrap_or(""),
                self.ssh_public_key.as_deref()?,
            ))
        } else {
            None
        }
    }
}

/// The hub's server of a host, with its units.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DesiredServer {
    pub hostname: String,
    pub ip: String,
    pub region: String,
    pub zone: String,
    pub status: ServerStatus,
    pub cpu_ranges: Vec<CpuList>,
    pub port_base: u16,
    pub ports_per_cpu: u16,
    pub uid_base: u32,
    pub limits: Limits,
    pub inventory_only: bool,
    pub created_at: String,
    pub updated_at: String,
    pub units: Vec<DesiredUnit>,
}

impl DesiredServer {
    /// The hub's view of a server (for the hub's `GET /api/hosts/{h}/state`).
    pub fn new(s: &Server, units: &[Unit]) -> DesiredServer {
        DesiredServer {
            hostname: s.hostname.clone(),
            ip: s.ip.clone(),
            region: s.region.clone(),
            zone: s.zone.clone(),
            status: s.status,
            cpu_ranges: s.cpu_ranges.clone(),
            port_base: s.port_base,
            ports_per_cpu: s.ports_per_cpu,
            uid_base: s.uid_base,
            limits: s.limits.clone(),
            inventory_only: s.inventory_only,
            created_at: s.created_at.clone(),
            updated_at: s.updated_at.clone(),
            units: units.to_vec(),
        }
    }

    /// Set up on the host (INITIALIZING or READY); anything else is torn down.
    pub fn is_present(&self) -> bool {
        matches!(
            self.status,
            ServerStatus::Initializing | ServerStatus::Ready
        )
    }

    /// The server row of the host's mirror (status READY: the host has set it up).
    pub fn to_server(&self) -> Server {
        Server {
            hostname: self.hostname.clone(),
            ip: self.ip.clone(),
            region: self.region.clone(),
            zone: self.zone.clone(),
            status: ServerStatus::Ready,
            cpu_ranges: self.cpu_ranges.clone(),
            port_base: self.port_base,
            ports_per_cpu: self.ports_per_cpu,
            uid_base: self.uid_base,
            limits: self.limits.clone(),
            inventory_only: self.inventory_only,
            created_at: self.created_at.clone(),
            updated_at: self.updated_at.clone(),
        }
    }
}

/// What a hub wants on one host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DesiredHostState {
    pub hostname: String,
    pub as_of: String,
    pub server: Option<DesiredServer>,
}

/// The server part of a report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerOutcome {
    pub created_at: String,
    pub ok: bool,
    pub error: Option<String>,
}

/// One unit of a report: what the host now has applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitOutcome {
    pub compute_id: String,
    pub claim: Option<String>,
    pub owned: bool,
    pub ok: bool,
    pub error: Option<String>,
    pub rolled_back: bool,
}

/// What a host sends after every pull.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub as_of: String,
    pub version: String,
    pub facts: Facts,
    pub server: Option<ServerOutcome>,
    pub units: Vec<UnitOutcome>,
    pub drift: Vec<String>,
}

/// What applying a desired state did (the report without `as_of`, version and facts).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Applied {
    pub server: Option<ServerOutcome>,
    pub units: Vec<UnitOutcome>,
    pub drift: Vec<String>,
}

// ---- the host's files ------------------------------------------------------------------------

/// `etc/kloigos/join.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinConfig {
    pub hubs: Vec<String>,
    pub hostname: String,
    pub poke_url: Option<String>,
}

impl JoinConfig {
    /// The join file under `root`; None when the host has not joined.
    pub fn load(root: &Path) -> Result<Option<JoinConfig>> {
        let path = root.join(JOIN_PATH);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(FleetError::Io {
                    what: format!("cannot read {}", path.display()),
                    source,
                });
            }
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|source| FleetError::Json {
                what: path.display().to_string(),
                source,
            })
    }
}

/// The host token under `root`.
pub fn read_token(path: &Path) -> Result<String> {
    let t = std::fs::read_to_string(path).map_err(|source| FleetError::Io {
        what: format!("cannot read the host token {}", path.display()),
        source,
    })?;
    let t = t.trim().to_string();
    if t.is_empty() || t.bytes().any(|b| !b.is_ascii_graphic()) {
        return Err(FleetError::Usage(format!(
            "{}: not a host token",
            path.display()
        )));
    }
    Ok(t)
}

/// Writes the join file (0644) and the token (0600) atomically under `root`.
pub fn write_join_files(root: &Path, join: &JoinConfig, token: &str) -> Result<()> {
    let host = crate::apply::Host::new(root);
    let mut json = serde_json::to_string_pretty(join).map_err(|source| FleetError::Json {
        what: JOIN_PATH.into(),
        source,
    })?;
    json.push('\n');
    host.write(
        &RenderedFile {
            path: PathBuf::from(TOKEN_PATH),
            content: format!("{token}\n"),
            mode: 0o600,
        },
        None,
    )?;
    host.write(
        &RenderedFile {
            path: PathBuf::from(JOIN_PATH),
            content: json,
            mode: 0o644,
        },
        None,
    )?;
    Ok(())
}

/// Removes the join file, then the token (`kloigos leave`): the host stops being joined the
/// moment the join file goes (every pull and the service key on it), and a leave interrupted
/// between the two finds the leftover token and removes it. Returns what it removed.
pub fn remove_join_files(root: &Path) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for rel in [JOIN_PATH, TOKEN_PATH] {
        let path = root.join(rel);
        match std::fs::remove_file(&path) {
            Ok(()) => removed.push(format!("/{rel}")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(FleetError::Io {
                    what: format!("cannot remove {}", path.display()),
                    source,
                });
            }
        }
    }
    Ok(removed)
}

/// Whether a host token file is left under `root` (a `leave` interrupted half-way).
pub fn token_left(root: &Path) -> bool {
    root.join(TOKEN_PATH).exists()
}

// ---- HTTP --------------------------------------------------------------------------------------

/// Host header, host and port of `http://HOST[:PORT]`.
fn target(base: &str) -> Result<(String, String, u16)> {
    let usage = |why: &str| FleetError::Usage(format!("hub {base:?}: {why}"));
    let uri: http::Uri = base.parse().map_err(|_| usage("not a URL"))?;
    if uri.scheme_str() != Some("http") {
        return Err(usage("must start with http://"));
    }
    let authority = uri.authority().ok_or_else(|| usage("no host"))?;
    if authority.as_str().contains('@') {
        return Err(usage("credentials in the URL are not supported"));
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    Ok((
        authority.as_str().to_string(),
        host.to_string(),
        authority.port_u16().unwrap_or(80),
    ))
}

/// One request to a hub: status and JSON answer.
async fn call(
    base: &str,
    token: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<(u16, Value)> {
    let (authority, host, port) = target(base)?;
    let hub_err = |why: String| FleetError::Hub {
        hub: base.to_string(),
        why,
    };
    let exchange = async {
        let stream = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| hub_err(format!("cannot connect: {e}")))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| hub_err(e.to_string()))?;
        tokio::spawn(conn);
        let payload = body.map(Value::to_string).unwrap_or_default();
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path.to_string())
            .header(hyper::header::HOST, authority)
            .header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(payload)))
            .map_err(|e| hub_err(e.to_string()))?;
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| hub_err(e.to_string()))?;
        let status = resp.status().as_u16();
        let bytes = http_body_util::Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| hub_err(e.to_string()))?
            .to_bytes();
        let v = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Ok((status, v))
    };
    tokio::time::timeout(HUB_TIMEOUT, exchange)
        .await
        .map_err(|_| hub_err(format!("no answer within {} s", HUB_TIMEOUT.as_secs())))?
}

/// The hub's `detail` of an error answer.
fn refusal(status: u16, v: &Value) -> String {
    match v.get("detail") {
        Some(Value::String(s)) => format!("{status}: {s}"),
        Some(d) => format!("{status}: {d}"),
        None => format!("{status}: {v}"),
    }
}

/// A request answered by the first hub that answers at all (a refusal is an answer).
async fn first_hub(
    hubs: &[String],
    token: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<(String, Value)> {
    let mut errors = Vec::new();
    for hub in hubs {
        match call(hub, token, method, path, body).await {
            Ok((s, v)) if (200..300).contains(&s) => return Ok((hub.clone(), v)),
            Ok((s, v)) if s >= 500 => errors.push(format!("{hub}: {}", refusal(s, &v))),
            Ok((s, v)) => {
                return Err(FleetError::Hub {
                    hub: hub.clone(),
                    why: refusal(s, &v),
                });
            }
            Err(e) => errors.push(crate::error::Chain(&e).to_string()),
        }
    }
    Err(FleetError::NoHub(errors.join("; ")))
}

fn hosts_path(hostname: &str, what: &str) -> String {
    let name: String =
        percent_encoding::utf8_percent_encode(hostname, percent_encoding::NON_ALPHANUMERIC)
            .to_string();
    format!("/api/hosts/{name}/{what}")
}

/// `POST /api/hosts/{h}/join` on the first hub that answers.
pub async fn join(join: &JoinConfig, token: &str, facts: &Facts) -> Result<String> {
    let body = serde_json::json!({
        "facts": facts,
        "poke_url": join.poke_url,
        "version": VERSION,
    });
    let (hub, _) = first_hub(
        &join.hubs,
        token,
        "POST",
        &hosts_path(&join.hostname, "join"),
        Some(&body),
    )
    .await?;
    Ok(hub)
}

/// One pull: fetch the desired state, apply it with `apply` (on a blocking thread), report.
/// The report is sent whatever the apply did; an error of the apply itself (the inventory,
/// the host lock) is sent as a failed server.
pub async fn pull<F>(join: &JoinConfig, token: &str, facts: Facts, apply: F) -> Result<Report>
where
    F: FnOnce(DesiredHostState) -> std::result::Result<Applied, crate::service::OpError>
        + Send
        + 'static,
{
    let (hub, state) = first_hub(
        &join.hubs,
        token,
        "GET",
        &hosts_path(&join.hostname, "state"),
        None,
    )
    .await?;
    let state: DesiredHostState =
        serde_json::from_value(state).map_err(|source| FleetError::Json {
            what: format!("the desired state from {hub}"),
            source,
        })?;
    if state.hostname != join.hostname {
        return Err(FleetError::Hub {
            hub,
            why: format!(
                "sent the state of {:?}, not of {:?}",
                state.hostname, join.hostname
            ),
        });
    }
    let as_of = state.as_of.clone();
    let created = state.server.as_ref().map(|s| s.created_at.clone());
    let applied = tokio::task::spawn_blocking(move || apply(state))
        .await
        .map_err(|e| FleetError::Usage(format!("the apply stopped: {e}")))?;
    let (applied, failure) = match applied {
        Ok(a) => (a, None),
        Err(e) => {
            let msg = crate::error::Chain(&e).to_string();
            (
                Applied {
                    server: created.map(|created_at| ServerOutcome {
                        created_at,
                        ok: false,
                        error: Some(msg.clone()),
                    }),
                    ..Default::default()
                },
                Some(e),
            )
        }
    };
    if let Some(d) = crate::service::test_pause_for("report") {
        tokio::time::sleep(d).await;
    }
    let report = Report {
        as_of,
        version: VERSION.to_string(),
        facts,
        server: applied.server,
        units: applied.units,
        drift: applied.drift,
    };
    let body = serde_json::to_value(&report).map_err(|source| FleetError::Json {
        what: "the report".into(),
        source,
    })?;
    // The hub that sent the state first, then the others.
    let mut hubs: Vec<String> = join.hubs.iter().filter(|h| **h != hub).cloned().collect();
    hubs.insert(0, hub);
    first_hub(
        &hubs,
        token,
        "POST",
        &hosts_path(&join.hostname, "report"),
        Some(&body),
    )
    .await?;
    match failure {
        Some(e) => Err(FleetError::Apply(e)),
        None => Ok(report),
    }
}

/// One pull of the host under `root` with its join files: fetch, apply with `k`, report.
pub async fn pull_host<K>(k: Arc<K>, root: PathBuf, pass: crate::service::Pass) -> Result<Report>
where
    K: std::ops::Deref<Target = crate::service::Kloigos> + Send + Sync + 'static,
{
    let join = JoinConfig::load(&root)?.ok_or_else(|| {
        FleetError::Usage(format!(
            "this host has not joined a hub (no {}); run `kloigos join`",
            root.join(JOIN_PATH).display()
        ))
    })?;
    let token = read_token(&root.join(TOKEN_PATH))?;
    // One whole pull at a time (the timer's and the service's): held until the report is sent.
    let k2 = k.clone();
    let (facts, _pulling) = tokio::task::spawn_blocking(move || {
        let lock = k2.pull_lock();
        (Facts::gather(&root), lock)
    })
    .await
    .map_err(|e| FleetError::Usage(format!("gathering facts stopped: {e}")))?;
    let _pulling = _pulling.map_err(FleetError::Lock)?;
    pull(&join, &token, facts, move |state| {
        k.apply_desired_as(&state, pass)
    })
    .await
}

// ---- pokes -------------------------------------------------------------------------------------

/// The least time between two pulls of `kloigos serve` (`KLOIGOS_PULL_MIN_INTERVAL`, seconds).
pub fn min_interval_from_env() -> Duration {
    std::env::var("KLOIGOS_PULL_MIN_INTERVAL")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .and_then(|s| Duration::try_from_secs_f64(s.max(0.0)).ok())
        .unwrap_or(Duration::from_millis(50))
}

/// Pulls a `kloigos serve` may make back to back before they are spaced by the minimum
/// interval.
const PULL_BURST: f64 = 10.0;

/// How long a `kloigos serve` may go on with quick pulls before a full one.
pub const FULL_PULL_EVERY: Duration = Duration::from_secs(60);

/// Pull requests of `kloigos serve`, coalesced: however many pokes arrive, at most one pull
/// runs and one more is pending, and pulls start at least `min_interval` apart. A poke asks
/// for a quick pass (what the hub changed); the first pull, the interval's and any pull
/// [`FULL_PULL_EVERY`] after the last full one are full passes (drift too).
pub struct Puller {
    pub join: JoinConfig,
    wake: tokio::sync::Notify,
    full: std::sync::atomic::AtomicBool,
    /// A pull asked for and not started yet, or one running: the service is not idle.
    pending: std::sync::atomic::AtomicBool,
    running: std::sync::atomic::AtomicBool,
    min_interval: Duration,
}

impl Puller {
    pub fn new(join: JoinConfig, min_interval: Duration) -> Arc<Puller> {
        Arc::new(Puller {
            join,
            wake: tokio::sync::Notify::new(),
            full: std::sync::atomic::AtomicBool::new(true),
            pending: std::sync::atomic::AtomicBool::new(false),
            running: std::sync::atomic::AtomicBool::new(false),
            min_interval,
        })
    }

    /// Asks for a pull (a poke, the start, the interval). Never waits.
    pub fn request(&self) {
        self.pending
            .store(true, std::sync::atomic::Ordering::SeqCst);
        // Notify keeps at most one permit: pokes during a pull make one more pull, not many.
        self.wake.notify_one();
    }

    /// Whether a pull runs or waits to: an idle exit or a stop waits for it (its report would
    /// otherwise wait for the timer).
    pub fn busy(&self) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        self.pending.load(SeqCst) || self.running.load(SeqCst)
    }

    /// Asks for a full pull (the interval's). Never waits.
    pub fn request_full(&self) {
        self.full.store(true, std::sync::atomic::Ordering::Relaxed);
        self.request();
    }

    /// Runs the pulls asked for, one at a time, forever. `pull_once` does one pull of the
    /// pass it is given and logs its outcome.
    pub async fn run<F, Fut>(self: Arc<Self>, mut pull_once: F)
    where
        F: FnMut(crate::service::Pass) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        use std::sync::atomic::Ordering;
        // A token bucket: up to PULL_BURST pulls back to back (an allocation right after
        // another does not wait), then one per `min_interval` (forged pokes cost no more).
        let mut tokens = PULL_BURST;
        let mut refilled = Instant::now();
        let mut last_full: Option<Instant> = None;
        loop {
            self.wake.notified().await;
            let interval = self.min_interval.as_secs_f64();
            if interval > 0.0 {
                let now = Instant::now();
                tokens = (tokens + now.duration_since(refilled).as_secs_f64() / interval)
                    .min(PULL_BURST);
                refilled = now;
                if tokens < 1.0 {
                    let wait = Duration::from_secs_f64((1.0 - tokens) * interval);
                    tokio::time::sleep(wait).await;
                    tokens = 1.0;
                    refilled = Instant::now();
                }
                tokens -= 1.0;
            }
            let now = Instant::now();
            let due = last_full.is_none_or(|t| now.duration_since(t) >= FULL_PULL_EVERY);
            let pass = if self.full.swap(false, Ordering::Relaxed) || due {
                last_full = Some(now);
                crate::service::Pass::Full
            } else {
                crate::service::Pass::Quick
            };
            // Running before no longer pending: `busy` never reads false in between.
            self.running.store(true, Ordering::SeqCst);
            self.pending.store(false, Ordering::SeqCst);
            pull_once(pass).await;
            self.running.store(false, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn systemd_version_is_the_first_number() {
        assert_eq!(
            parse_systemd_version("systemd 252 (252.22-1~deb12u1)\n+PAM +AUDIT"),
            Some(252)
        );
        assert_eq!(parse_systemd_version("systemd x"), None);
        assert_eq!(parse_systemd_version(""), None);
    }

    #[test]
    fn the_contract_example_state_parses() {
        let v = serde_json::json!({"hostname": "h1", "as_of": "2026-11-23T20:00:00.123456Z",
            "server": {"hostname": "h1", "ip": "10.0.0.5", "region": "r", "zone": "z",
              "status": "READY", "cpu_ranges": ["0-3"], "port_base": 2000, "ports_per_cpu": 100,
              "uid_base": 20000, "limits": {}, "inventory_only": false,
              "created_at": "t", "updated_at": "t",
              "units": [{"compute_id": "h1_0-3", "hostname": "h1", "ip": "10.0.0.5",
                "region": "r", "zone": "z", "cpu_range": "0-3", "cpu_count": 4, "first_cpu": 0,
                "uid": 20000, "user": "u0-3", "ports_range": "2000-2399", "status": "ALLOCATED",
                "started_at": null, "tags": {"a": 1}, "ssh_public_key": "ssh-ed25519 AAAA x",
                "allocated_by": "token:a", "updated_at": "t", "problem": null, "claim": "c1"}]}});
        let s: DesiredHostState = serde_json::from_value(v).unwrap();
        let server = s.server.unwrap();
        assert!(server.is_present());
        assert_eq!(server.units[0].owner(), Some(("c1", "ssh-ed25519 AAAA x")));
        // And back: the same field names the hub's store::Unit serializes.
        let again = serde_json::to_value(&server.units[0]).unwrap();
        assert_eq!(again["ports_range"], "2000-2399");
        assert_eq!(again["claim"], "c1");
    }

    #[test]
    fn facts_of_a_fake_root() {
        let tmp = tempfile::tempdir().unwrap();
        let r = tmp.path();
        let w = |p: &str, c: &str| {
            std::fs::create_dir_all(r.join(p).parent().unwrap()).unwrap();
            std::fs::write(r.join(p), c).unwrap();
        };
        w("sys/devices/system/cpu/online", "0-15\n");
        w("sys/devices/system/node/node0/cpulist", "0-7\n");
        w("sys/devices/system/node/node1/cpulist", "8-15\n");
        w("proc/sys/net/ipv4/ip_local_port_range", "32768\t60999\n");
        let f = Facts::gather(r);
        assert_eq!(
            serde_json::to_value(&f).unwrap(),
            serde_json::json!({"cpus_online": "0-15", "numa_nodes": {"0": "0-7", "1": "8-15"},
                "ephemeral_ports": [32768, 60999], "systemd_version": null,
                "socket_bind": false, "kloigos_version": VERSION})
        );
    }

    #[tokio::test]
    async fn pokes_coalesce_into_one_pending_pull() {
        use crate::service::Pass;
        let join = JoinConfig {
            hubs: vec![],
            hostname: "h1".into(),
            poke_url: None,
        };
        let p = Puller::new(join, Duration::from_millis(50));
        let passes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = passes.clone();
        let task = tokio::spawn(p.clone().run(move |pass| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().push(pass);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));
        let count = || passes.lock().unwrap().len();
        for _ in 0..1000 {
            p.request();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(count(), 1);
        // While that pull runs: one more, however many pokes.
        for _ in 0..1000 {
            p.request();
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(count(), 2);
        // The interval asks for a full pass, pokes for quick ones; the first is full.
        p.request_full();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            *passes.lock().unwrap(),
            [Pass::Full, Pass::Quick, Pass::Full]
        );
        task.abort();
    }

    #[test]
    fn hub_urls() {
        assert_eq!(
            target("http://10.0.0.1:8000").unwrap(),
            ("10.0.0.1:8000".into(), "10.0.0.1".into(), 8000)
        );
        assert!(target("https://h").is_err());
        assert!(target("http://u:p@h").is_err());
        assert_eq!(hosts_path("h 1", "state"), "/api/hosts/h%201/state");
    }
}
