//! A hub's side of servers of joined fleet hosts (not this host, not inventory-only): the hub
//! never touches such a host. It records the intent in the inventory, a caller pokes the host
//! (see `api::fleet`), and the host pulls its desired state, applies it and reports. This
//! module holds the wire types of that exchange, the pure rules that read a report, and the
//! moves that conclude an operation from a report or a timeout (also the periodic sweep, so a
//! hub killed mid-wait leaves nothing stuck).

use super::{Invalid, InvalidList, Kloigos, LocPart, OpError, Result, unit_json};
use crate::store::{HostRecord, Server, ServerStatus, Transition, Unit, UnitChange, UnitStatus};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::HashSet;
use std::time::Duration;
use tracing::{info, warn};

/// How old a claim or a release the host's report decided must be before the sweep concludes
/// it for a hub that waits on it elsewhere (that hub does it within moments of the report,
/// unless it was killed; concluding it for it would only duplicate the work).
const ORPHANED_AFTER: Duration = Duration::from_secs(3);

/// What a host reports about itself (all read under its `--root`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Facts {
    /// Online CPUs, as a CPU list (`0-63`).
    pub cpus_online: Option<String>,
    /// NUMA node → its CPUs, as CPU lists.
    pub numa_nodes: Option<std::collections::BTreeMap<String, String>>,
    /// The kernel's ephemeral port range `[low, high]`.
    pub ephemeral_ports: Option<[u16; 2]>,
    pub systemd_version: Option<u32>,
    /// Whether systemd enforces `SocketBindAllow=` there.
    pub socket_bind: bool,
    pub kloigos_version: String,
}

/// `POST /api/hosts/{hostname}/join`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    pub facts: Facts,
    /// Where a hub pokes the host (`http://IP:PORT/api/host/poke`); null: the host pulls on
    /// its timer only.
    pub poke_url: Option<String>,
    pub version: String,
}

/// How the host fared with the server it was asked to set up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ServerOutcome {
    /// The `created_at` of the server record it applied.
    pub created_at: String,
    pub ok: bool,
    pub error: Option<String>,
}

/// How the host fared with one unit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UnitOutcome {
    pub compute_id: String,
    /// The claim the host has applied (null: nobody's).
    pub claim: Option<String>,
    /// Whether the host now has an owner applied on it.
    pub owned: bool,
    pub ok: bool,
    pub error: Option<String>,
    /// After a failure, the host released the unit cleanly.
    #[serde(default)]
    pub rolled_back: bool,
}

/// `POST /api/hosts/{hostname}/report`: what a host applied, after every pull.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Report {
    /// The `as_of` of the desired state it applied.
    pub as_of: String,
    pub version: String,
    pub facts: Facts,
    /// Null: the host has no server (torn down, or none desired).
    pub server: Option<ServerOutcome>,
    #[serde(default)]
    pub units: Vec<UnitOutcome>,
    /// What the host found different from the desired state and repaired.
    #[serde(default)]
    pub drift: Vec<String>,
}

impl Report {
    fn unit(&self, compute_id: &str) -> Option<&UnitOutcome> {
        self.units.iter().find(|u| u.compute_id == compute_id)
    }

    /// `id: error` of each unit the host could not apply.
    pub fn units_failed(&self) -> Vec<String> {
        self.units
            .iter()
            .filter(|u| !u.ok)
            .map(|u| {
                format!(
                    "{}: {}",
                    u.compute_id,
                    u.error.as_deref().unwrap_or("failed")
                )
            })
            .collect()
    }
}

/// The last report of a host, if it has one that reads as a [`Report`].
pub fn last_report(host: &HostRecord) -> Option<Report> {
    serde_json::from_value(host.last_report.clone()?).ok()
}

/// `a >= b` for RFC 3339 times (a string that does not parse is never later).
pub(crate) fn not_before(a: &str, b: &str) -> bool {
    use time::OffsetDateTime;
    use time::format_description::well_known::Rfc3339;
    match (
        OffsetDateTime::parse(a, &Rfc3339),
        OffsetDateTime::parse(b, &Rfc3339),
    ) {
        (Ok(a), Ok(b)) => a >= b,
        _ => false,
    }
}

/// Whether the RFC 3339 time `t` is more than `d` ago (unparsable: yes, it is not fresh).
pub(crate) fn older_than(t: &str, d: Duration) -> bool {
    !not_before(t, &crate::time::ago(d))
}

/// What a report says of an allocation with claim `claim`: `Some(Ok(()))` applied, `Some(Err(
/// (rolled_back, why)))` failed, `None` not decided yet.
pub fn allocation_outcome(
    r: &Report,
    compute_id: &str,
    claim: &str,
) -> Option<std::result::Result<(), (bool, String)>> {
    let u = r.unit(compute_id)?;
    if u.claim.as_deref() != Some(claim) {
        return None;
    }
    if !u.ok {
        let why = u.error.clone().unwrap_or_else(|| "failed".into());
        return Some(Err((u.rolled_back, why)));
    }
    u.owned.then_some(Ok(()))
}

/// What a report made at or after `since` says of a unit nobody owns any more: released
/// (`Ok`), or failed to release (`Err`). A report of a host without a server released it too.
pub fn release_outcome(
    r: &Report,
    compute_id: &str,
    since: &str,
) -> Option<std::result::Result<(), String>> {
    if !not_before(&r.as_of, since) {
        return None;
    }
    if r.server.is_none() {
        return Some(Ok(()));
    }
    let u = r.unit(compute_id)?;
    match (u.ok, u.owned) {
        (false, _) => Some(Err(u.error.clone().unwrap_or_else(|| "failed".into()))),
        (true, false) => Some(Ok(())),
        (true, true) => None,
    }
}

/// What a report says of the set-up of the server created at `created_at`.
pub fn init_outcome(r: &Report, created_at: &str) -> Option<std::result::Result<(), String>> {
    let s = r.server.as_ref().filter(|s| s.created_at == created_at)?;
    Some(if s.ok {
        Ok(())
    } else {
        Err(s.error.clone().unwrap_or_else(|| "failed".into()))
    })
}

/// Whether a report made at or after `since` says the host tore its server down.
pub fn torn_down(r: &Report, since: &str) -> bool {
    r.server.is_none() && not_before(&r.as_of, since)
}

/// The facts of a joined host, for validating an init_server of it.
pub(super) struct RemoteFacts {
    pub(super) online: Option<crate::model::CpuList>,
    pub(super) ephemeral_low: Option<u16>,
}

/// A step of an operation that a joined host must apply: done here (this host, or an
/// inventory-only server), or recorded and waiting for the host.
#[derive(Debug)]
pub enum Begun<T> {
    Done(T),
    /// Recorded; the hub now pokes the host and waits for its report.
    Remote(T),
}

/// How a remote operation ended, for the API.
#[derive(Debug)]
pub enum Concluded<T> {
    Done(T),
    /// Still undecided (keep waiting).
    Pending,
}

impl Kloigos {
    /// The apply timeout (`--apply-timeout`): how long a hub waits for a host's report.
    pub fn apply_timeout(&self) -> Duration {
        self.apply_timeout
    }

    pub fn set_apply_timeout(&mut self, d: Duration) {
        self.apply_timeout = d;
    }

    pub fn set_placement(&mut self, p: super::Placement) {
        self.placement = p;
    }

    /// Whether a server is applied by a joined host (neither this host's nor inventory-only).
    pub(crate) fn is_remote(&self, s: &Server) -> bool {
        !self.is_local(&s.hostname) && !s.inventory_only
    }

    /// The facts a joined host reported, for init_server; a 422 on `hostname` when the host
    /// has not joined.
    pub(super) fn remote_facts(&self, hostname: &str) -> Result<RemoteFacts> {
        let host = self.store.host(hostname)?.filter(|h| h.joined_at.is_some());
        let Some(host) = host else {
            return Err(OpError::Invalid(InvalidList(vec![Invalid {
                loc: vec![LocPart::Field("hostname")],
                input: hostname.to_string(),
                reason: format!(
                    "host {hostname} has not joined; run `kloigos join` on it, or pass \
                     `inventory_only: true`"
                ),
            }])));
        };
        let facts: Option<Facts> = host.facts.and_then(|f| serde_json::from_value(f).ok());
        Ok(RemoteFacts {
            online: facts
                .as_ref()
                .and_then(|f| f.cpus_online.as_deref())
                .and_then(|c| c.parse().ok()),
            ephemeral_low: facts.and_then(|f| f.ephemeral_ports).map(|p| p[0]),
        })
    }

    /// One compare-and-set that concludes a remote operation, and its audit record. (Kept in
    /// one place so a backend's `transition_logged` can do both in one transaction.)
    fn conclude_unit(
        &self,
        unit: &Unit,
        from: &[UnitStatus],
        to: UnitStatus,
        change: UnitChange,
        audit: (&str, &str, std::result::Result<(), &str>),
    ) -> Result<Transition> {
        let (actor, operation, result) = audit;
        // The move and its audit row commit together: what the audit says happened, happened.
        let after = unit_json(&changed(unit, to, &change));
        Ok(self.store.transition_logged(
            &unit.compute_id,
            from,
            to,
            change,
            crate::store::NewEvent {
                actor,
                operation,
                compute_id: Some(&unit.compute_id),
                hostname: Some(&unit.hostname),
                result,
                before: Some(unit_json(unit)),
                after: Some(after),
            },
        )?)
    }

    /// The last report of a joined host, if any.
    fn report_of(&self, hostname: &str) -> Result<Option<Report>> {
        Ok(self
            .store
            .host(hostname)?
            .and_then(|h| h.last_report)
            .and_then(|r| serde_json::from_value(r).ok()))
    }

    /// The unit as it is now, after someone else concluded it: the answer the waiting caller
    /// gets.
    fn concluded_by_other(&self, unit: &Unit, operation: &str) -> Result<Concluded<Unit>> {
        let now = self.unit(&unit.compute_id)?;
        let ok = match operation {
            "allocate" => {
                now.status == UnitStatus::Allocated
                    && now.claim.is_some()
                    && now.claim == unit.claim
            }
            _ => now.status == UnitStatus::Free,
        };
        if ok {
            Ok(Concluded::Done(now))
        } else {
            Err(OpError::Failed(format!(
                "{operation} of {} failed on host {}: the unit is {}",
                unit.compute_id, unit.hostname, now.status
            )))
        }
    }

    /// Concludes a remote allocation from the host's last report, if it decides it.
    ///
    /// The report is read first: until it decides, one read is all a waiter's check costs.
    /// (Only the waiter and the sweep, past the apply timeout, conclude a claim, so a unit
    /// concluded by someone else is found by the compare-and-set, or at the timeout.)
    pub fn conclude_remote_allocate(&self, unit: &Unit, actor: &str) -> Result<Concluded<Unit>> {
        let claim = unit.claim.as_deref().unwrap_or_default();
        let report = self.report_of(&unit.hostname)?;
        let Some(outcome) = report
            .as_ref()
            .and_then(|r| allocation_outcome(r, &unit.compute_id, claim))
        else {
            return Ok(Concluded::Pending);
        };
        let id = &unit.compute_id;
        let h = &unit.hostname;
        match outcome {
            Ok(()) => {
                let change = UnitChange {
                    started_at: Some(Some(crate::time::now())),
                    ..Default::default()
                };
                match self.conclude_unit(
                    unit,
                    &[UnitStatus::Allocating],
                    UnitStatus::Allocated,
                    change,
                    (actor, "allocate", Ok(())),
                )? {
                    Transition::Done(u) => {
                        info!(compute_id = %id, hostname = %h, actor, "allocated on the host");
                        Ok(Concluded::Done(*u))
                    }
                    _ => self.concluded_by_other(unit, "allocate"),
                }
            }
            Err((rolled_back, why)) => {
                let (to, change, state) = if rolled_back {
                    (UnitStatus::Free, UnitChange::cleared(), "rolled back")
                } else {
                    (
                        UnitStatus::AllocationFail,
                        UnitChange::default(),
                        "unit is ALLOCATION_FAIL; the host releases it when it next pulls",
                    )
                };
                let msg = format!("allocation of {id} failed on host {h}: {why} ({state})");
                match self.conclude_unit(
                    unit,
                    &[UnitStatus::Allocating],
                    to,
                    change,
                    (actor, "allocate", Err(&msg)),
                )? {
                    Transition::Done(_) => Err(OpError::Failed(msg)),
                    _ => self.concluded_by_other(unit, "allocate"),
                }
            }
        }
    }

    /// The poke of a claimed unit's host failed: the host is marked unreachable and the unit
    /// goes back to FREE at once (the caller tries another host).
    pub fn remote_allocate_unreachable(&self, unit: &Unit, reason: &str) -> Result<()> {
        self.store.host_unreachable(&unit.hostname, Some(reason))?;
        warn!(compute_id = %unit.compute_id, hostname = %unit.hostname, reason, "poke failed");
        self.release_claim(
            unit,
            &format!(
                "host {} is unreachable ({reason}); {} released, trying another host",
                unit.hostname, unit.compute_id
            ),
        )
    }

    /// A claim given back before the host was asked to apply it: FREE again, audited.
    pub(super) fn release_claim(&self, unit: &Unit, why: &str) -> Result<()> {
        self.conclude_unit(
            unit,
            &[UnitStatus::Allocating],
            UnitStatus::Free,
            UnitChange::cleared(),
            ("hub", "allocate", Err(why)),
        )?;
        Ok(())
    }

    /// The host did not report in time: the unit is released (FREE); 504.
    pub fn remote_allocate_timeout(&self, unit: &Unit, actor: &str) -> Result<Unit> {
        let secs = self.apply_timeout.as_secs_f64();
        let msg = format!(
            "host {} did not apply the allocation of {} within {secs} s; the unit was released, \
             and the host undoes anything it applied when it next pulls",
            unit.hostname, unit.compute_id
        );
        match self.conclude_unit(
            unit,
            &[UnitStatus::Allocating],
            UnitStatus::Free,
            UnitChange::cleared(),
            (actor, "allocate", Err(&msg)),
        )? {
            Transition::Done(_) => Err(OpError::Timeout(msg)),
            // Concluded at the last moment by a report (here or at another hub).
            _ => match self.concluded_by_other(unit, "allocate")? {
                Concluded::Done(u) => Ok(u),
                Concluded::Pending => Err(OpError::Timeout(msg)),
            },
        }
    }

    /// Concludes a remote deallocation (the unit went DEALLOCATING at `unit.updated_at`).
    /// (The report first, as in [`Kloigos::conclude_remote_allocate`].)
    pub fn conclude_remote_deallocate(&self, unit: &Unit, actor: &str) -> Result<Concluded<()>> {
        let report = self.report_of(&unit.hostname)?;
        let Some(outcome) = report
            .as_ref()
            .and_then(|r| release_outcome(r, &unit.compute_id, &unit.updated_at))
        else {
            return Ok(Concluded::Pending);
        };
        let id = &unit.compute_id;
        let (to, change, msg) = match outcome {
            Ok(()) => (UnitStatus::Free, UnitChange::cleared(), None),
            Err(why) => (
                UnitStatus::DeallocationFail,
                UnitChange::default(),
                Some(format!(
                    "deallocation of {id} failed on host {}: {why} (unit is DEALLOCATION_FAIL; retry deallocate)",
                    unit.hostname
                )),
            ),
        };
        let result = match &msg {
            Some(m) => Err(m.as_str()),
            None => Ok(()),
        };
        match self.conclude_unit(
            unit,
            &[UnitStatus::Deallocating],
            to,
            change,
            (actor, "deallocate", result),
        )? {
            Transition::Done(_) => match msg {
                Some(m) => Err(OpError::Failed(m)),
                None => Ok(Concluded::Done(())),
            },
            _ => self
                .concluded_by_other(unit, "deallocate")
                .map(|_| Concluded::Done(())),
        }
    }

    /// The host did not release the unit in time: DEALLOCATION_FAIL (the sweep makes it FREE
    /// once the host reports it released); 504.
    pub fn remote_deallocate_timeout(
        &self,
        unit: &Unit,
        actor: &str,
        unreachable: Option<&str>,
    ) -> Result<()> {
        let secs = self.apply_timeout.as_secs_f64();
        let why = match unreachable {
            Some(why) => format!("host {} cannot be reached ({why})", unit.hostname),
            None => format!(
                "host {} did not release {} within {secs} s",
                unit.hostname, unit.compute_id
            ),
        };
        let msg =
            format!("{why}; it releases the unit when it next pulls; the unit then becomes FREE");
        match self.conclude_unit(
            unit,
            &[UnitStatus::Deallocating],
            UnitStatus::DeallocationFail,
            UnitChange::default(),
            (actor, "deallocate", Err(&msg)),
        )? {
            Transition::Done(_) => Err(OpError::Timeout(msg)),
            _ => self.concluded_by_other(unit, "deallocate").map(|_| ()),
        }
    }

    /// Concludes a remote init_server from the host's report about `server` (as recorded).
    pub fn conclude_remote_init(
        &self,
        server: &Server,
        actor: &str,
        timed_out: bool,
    ) -> Result<Concluded<()>> {
        let h = &server.hostname;
        let current = self.store.server(h)?;
        let Some(current) = current.filter(|c| c.created_at == server.created_at) else {
            return Err(OpError::Failed(format!(
                "init_server of {h} failed on the host (the server record was removed)"
            )));
        };
        if current.status == ServerStatus::Ready {
            return Ok(Concluded::Done(()));
        }
        if current.status != ServerStatus::Initializing {
            return Err(OpError::Failed(format!(
                "init_server of {h}: the server is {}",
                current.status
            )));
        }
        let report = self.store.host(h)?.as_ref().and_then(last_report);
        let outcome = report
            .as_ref()
            .and_then(|r| init_outcome(r, &server.created_at));
        let after = json!({"hostname": h, "cpu_ranges": server.cpu_ranges});
        match outcome {
            Some(Ok(())) => {
                self.store
                    .set_server_status(h, ServerStatus::Ready, Some(UnitStatus::Free))?;
                info!(hostname = %h, operation = "init_server", "server ready on its host");
                self.record(
                    actor,
                    "init_server",
                    None,
                    Some(h),
                    Ok(()),
                    None,
                    Some(after),
                );
                Ok(Concluded::Done(()))
            }
            None if !timed_out => Ok(Concluded::Pending),
            other => {
                let (msg, err) = match other {
                    Some(Err(why)) => (
                        format!(
                            "init_server failed on host {h}: {why} (the server record was \
                             removed; the host tears down what it made when it next pulls)"
                        ),
                        OpError::Failed as fn(String) -> OpError,
                    ),
                    _ => (
                        format!(
                            "host {h} did not set the server up within {} s; the server record \
                             was removed, and the host tears down what it made when it next pulls",
                            self.apply_timeout.as_secs_f64()
                        ),
                        OpError::Timeout as fn(String) -> OpError,
                    ),
                };
                self.store.delete_server(h)?;
                self.record(
                    actor,
                    "init_server",
                    None,
                    Some(h),
                    Err(&msg),
                    None,
                    Some(after),
                );
                Err(err(msg))
            }
        }
    }

    /// Concludes a remote decommission (the server went DECOMMISSIONING at
    /// `server.updated_at`).
    pub fn conclude_remote_decommission(
        &self,
        server: &Server,
        actor: &str,
        timed_out: bool,
    ) -> Result<Concluded<()>> {
        let h = &server.hostname;
        match self.store.server(h)? {
            Some(s) if s.status == ServerStatus::Decommissioning => {}
            Some(s) if s.status == ServerStatus::Decommissioned => {
                return Ok(Concluded::Done(()));
            }
            _ => {
                return Err(OpError::Failed(format!(
                    "decommission of {h}: the server changed under us"
                )));
            }
        }
        let report = self.store.host(h)?.as_ref().and_then(last_report);
        if report
            .as_ref()
            .is_some_and(|r| torn_down(r, &server.updated_at))
        {
            self.store.retire_server(h, ServerStatus::Decommissioned)?;
            self.record(
                actor,
                "decommission_server",
                None,
                Some(h),
                Ok(()),
                Some(json!({"status": "DECOMMISSIONING"})),
                Some(json!({"status": "DECOMMISSIONED"})),
            );
            return Ok(Concluded::Done(()));
        }
        if !timed_out {
            return Ok(Concluded::Pending);
        }
        Err(OpError::Timeout(format!(
            "host {h} did not tear the server down within {} s; it stays DECOMMISSIONING and \
             the decommission finishes when the host next pulls",
            self.apply_timeout.as_secs_f64()
        )))
    }

    /// Finishes what the host's last report settles and what timed out, for every remote
    /// server (or only `only`), leaving alone what this process is waiting for (`waited`:
    /// compute ids and hostnames). Every move is a compare-and-set, so hubs sweeping together
    /// are safe. Returns the hosts to poke (a unit released there).
    pub fn sweep(&self, only: Option<&str>, waited: &HashSet<String>) -> Result<Vec<String>> {
        let mut poke = Vec::new();
        let grace = self.apply_timeout + Duration::from_secs(5);
        let servers = match only {
            Some(h) => self.store.server(h)?.into_iter().collect(),
            // Only joined hosts' servers are swept: no load from inventory-only ones.
            None => self.store.remote_servers(&self.local)?,
        };
        for server in servers {
            if !self.is_remote(&server) {
                continue;
            }
            let h = server.hostname.clone();
            let report = self.store.host(&h)?.as_ref().and_then(last_report);
            if !waited.contains(&h) {
                match server.status {
                    ServerStatus::Initializing => {
                        let decided = report
                            .as_ref()
                            .and_then(|r| init_outcome(r, &server.created_at))
                            .is_some();
                        if decided || older_than(&server.updated_at, grace) {
                            let _ = self.conclude_remote_init(&server, "hub", true);
                        }
                        continue;
                    }
                    ServerStatus::Decommissioning => {
                        let _ = self.conclude_remote_decommission(&server, "hub", false);
                        continue;
                    }
                    _ => {}
                }
            }
            for unit in self.store.units_of(&h)? {
                if waited.contains(&unit.compute_id) {
                    continue;
                }
                if self.sweep_unit(&unit, report.as_ref(), grace)? {
                    poke.push(h.clone());
                }
            }
        }
        poke.dedup();
        Ok(poke)
    }

    /// One unit of the sweep; true when the host should be poked.
    fn sweep_unit(&self, unit: &Unit, report: Option<&Report>, grace: Duration) -> Result<bool> {
        let id = unit.compute_id.as_str();
        match unit.status {
            UnitStatus::Allocating => {
                let actor = unit.allocated_by.clone().unwrap_or_else(|| "hub".into());
                let decided = report.is_some_and(|r| {
                    allocation_outcome(r, id, unit.claim.as_deref().unwrap_or_default()).is_some()
                });
                if decided && older_than(&unit.updated_at, ORPHANED_AFTER) {
                    let _ = self.conclude_remote_allocate(unit, &actor);
                } else if older_than(&unit.updated_at, grace) {
                    let msg = format!(
                        "host {} did not apply the allocation of {id} in time; released by the sweep",
                        unit.hostname
                    );
                    if let Transition::Done(_) = self.conclude_unit(
                        unit,
                        &[UnitStatus::Allocating],
                        UnitStatus::Free,
                        UnitChange::cleared(),
                        ("hub", "allocate", Err(&msg)),
                    )? {
                        return Ok(true);
                    }
                }
            }
            UnitStatus::Deallocating => {
                let decided =
                    report.is_some_and(|r| release_outcome(r, id, &unit.updated_at).is_some());
                if decided && older_than(&unit.updated_at, ORPHANED_AFTER) {
                    let _ = self.conclude_remote_deallocate(unit, "hub");
                } else if older_than(&unit.updated_at, grace) {
                    let msg = format!(
                        "host {} did not release {id} in time; DEALLOCATION_FAIL until it reports",
                        unit.hostname
                    );
                    self.conclude_unit(
                        unit,
                        &[UnitStatus::Deallocating],
                        UnitStatus::DeallocationFail,
                        UnitChange::default(),
                        ("hub", "deallocate", Err(&msg)),
                    )?;
                    return Ok(true);
                }
            }
            UnitStatus::AllocationFail | UnitStatus::DeallocationFail => {
                let released = report.is_some_and(|r| {
                    r.as_of != unit.updated_at
                        && release_outcome(r, id, &unit.updated_at) == Some(Ok(()))
                });
                if released {
                    self.conclude_unit(
                        unit,
                        &[unit.status],
                        UnitStatus::Free,
                        UnitChange::cleared(),
                        ("hub", "reconcile", Ok(())),
                    )?;
                }
            }
            _ => {}
        }
        Ok(false)
    }
}

/// `unit` as a transition to `to` with `change` leaves it (what its audit row records).
pub(super) fn changed(unit: &Unit, to: UnitStatus, change: &UnitChange) -> Unit {
    let mut u = unit.clone();
    u.status = to;
    if let Some(v) = &change.started_at {
        u.started_at.clone_from(v);
    }
    if let Some(v) = &change.tags {
        u.tags.clone_from(v);
    }
    if let Some(v) = &change.ssh_public_key {
        u.ssh_public_key.clone_from(v);
    }
    if let Some(v) = &change.allocated_by {
        u.allocated_by.clone_from(v);
    }
    if let Some(v) = &change.problem {
        u.problem.clone_from(v);
    }
    if let Some(v) = &change.claim {
        u.claim.clone_from(v);
    }
    u
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(as_of: &str, server: Option<ServerOutcome>, units: Vec<UnitOutcome>) -> Report {
        Report {
            as_of: as_of.into(),
            version: "0.1.0".into(),
            facts: Facts {
                cpus_online: Some("0-3".into()),
                numa_nodes: None,
                ephemeral_ports: Some([32768, 60999]),
                systemd_version: Some(252),
                socket_bind: true,
                kloigos_version: "0.1.0".into(),
            },
            server,
            units,
            drift: vec![],
        }
    }

    fn unit(
        id: &str,
        claim: Option<&str>,
        owned: bool,
        ok: bool,
        rolled_back: bool,
    ) -> UnitOutcome {
        UnitOutcome {
            compute_id: id.into(),
            claim: claim.map(Into::into),
            owned,
            ok,
            error: (!ok).then(|| "boom".into()),
            rolled_back,
        }
    }

    fn srv(created_at: &str, ok: bool) -> Option<ServerOutcome> {
        Some(ServerOutcome {
            created_at: created_at.into(),
            ok,
            error: (!ok).then(|| "no disk".into()),
        })
    }

    const T0: &str = "2026-11-23T20:00:00.5Z";
    const T1: &str = "2026-11-23T20:00:01Z";

    #[test]
    fn an_allocation_is_decided_only_by_its_own_claim() {
        let ok = report(
            T1,
            srv(T0, true),
            vec![unit("h_0-1", Some("c1"), true, true, false)],
        );
        assert_eq!(allocation_outcome(&ok, "h_0-1", "c1"), Some(Ok(())));
        assert_eq!(
            allocation_outcome(&ok, "h_0-1", "c2"),
            None,
            "another claim"
        );
        assert_eq!(allocation_outcome(&ok, "h_2-3", "c1"), None, "another unit");
        let failed = report(
            T1,
            srv(T0, true),
            vec![unit("h_0-1", Some("c1"), false, false, true)],
        );
        assert_eq!(
            allocation_outcome(&failed, "h_0-1", "c1"),
            Some(Err((true, "boom".into())))
        );
        let not_yet = report(
            T1,
            srv(T0, true),
            vec![unit("h_0-1", Some("c1"), false, true, false)],
        );
        assert_eq!(allocation_outcome(&not_yet, "h_0-1", "c1"), None);
    }

    #[test]
    fn a_release_needs_a_report_made_after_it_was_asked() {
        let released = report(
            T1,
            srv(T0, true),
            vec![unit("h_0-1", None, false, true, false)],
        );
        assert_eq!(release_outcome(&released, "h_0-1", T0), Some(Ok(())));
        assert_eq!(
            release_outcome(&released, "h_0-1", "2026-11-23T20:00:02Z"),
            None,
            "an older report says nothing of a later release"
        );
        let still = report(
            T1,
            srv(T0, true),
            vec![unit("h_0-1", Some("c"), true, true, false)],
        );
        assert_eq!(release_outcome(&still, "h_0-1", T0), None);
        let failed = report(
            T1,
            srv(T0, true),
            vec![unit("h_0-1", Some("c"), true, false, false)],
        );
        assert_eq!(
            release_outcome(&failed, "h_0-1", T0),
            Some(Err("boom".into()))
        );
        let gone = report(T1, None, vec![]);
        assert_eq!(release_outcome(&gone, "h_0-1", T0), Some(Ok(())));
    }

    #[test]
    fn init_and_decommission_read_the_server_outcome() {
        assert_eq!(
            init_outcome(&report(T1, srv(T0, true), vec![]), T0),
            Some(Ok(()))
        );
        assert_eq!(
            init_outcome(&report(T1, srv(T0, false), vec![]), T0),
            Some(Err("no disk".into()))
        );
        assert_eq!(
            init_outcome(&report(T1, srv(T1, true), vec![]), T0),
            None,
            "another record"
        );
        assert_eq!(init_outcome(&report(T1, None, vec![]), T0), None);
        assert!(torn_down(&report(T1, None, vec![]), T0));
        assert!(!torn_down(&report(T0, None, vec![]), T1));
        assert!(!torn_down(&report(T1, srv(T0, true), vec![]), T0));
    }

    #[test]
    fn times_compare_as_times_not_strings() {
        // As strings "…00Z" > "…00.5Z"; as times it is earlier.
        assert!(not_before("2026-11-23T20:00:00.5Z", "2026-11-23T20:00:00Z"));
        assert!(!not_before(
            "2026-11-23T20:00:00Z",
            "2026-11-23T20:00:00.5Z"
        ));
        assert!(!not_before("garbage", "2026-11-23T20:00:00Z"));
        assert!(older_than("2020-01-01T00:00:00Z", Duration::from_secs(1)));
        assert!(!older_than(&crate::time::now(), Duration::from_secs(60)));
    }

    #[test]
    fn reports_are_strict() {
        let good = serde_json::json!({
            "as_of": T1, "version": "0.1.0",
            "facts": {"cpus_online": "0-63", "numa_nodes": {"0": "0-31", "1": "32-63"},
                      "ephemeral_ports": [32768, 60999], "systemd_version": 252,
                      "socket_bind": true, "kloigos_version": "0.1.0"},
            "server": {"created_at": T0, "ok": true, "error": null},
            "units": [{"compute_id": "h1_0-3", "claim": "ab12", "owned": true, "ok": true,
                       "error": null, "rolled_back": false}],
            "drift": ["etc/tmpfiles.d/kloigos-u0-3.conf rewritten"]
        });
        let r: Report = serde_json::from_value(good.clone()).unwrap();
        assert_eq!(r.units.len(), 1);
        let mut bad = good.clone();
        bad["units"][0]["extra"] = serde_json::json!(1);
        assert!(serde_json::from_value::<Report>(bad).is_err());
        let mut bad = good;
        bad["facts"]["ephemeral_ports"] = serde_json::json!([1]);
        assert!(serde_json::from_value::<Report>(bad).is_err());
    }
}
