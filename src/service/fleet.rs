//! A joined host applying its hub's desired state (README, "Fleet"). The host keeps a local
//! mirror of its own server in its inventory: the rows it applied, with each unit's claim, so
//! "what I applied before" survives a restart and reconcile, `render`, `doctor` and reads work
//! unchanged. Applying compares the hub's state with the mirror, changes the host with the same
//! steps as the local operations (`take_down`, `release`, `apply_allocate`, `converge`), and
//! makes the mirror equal to what was applied.

use super::{Kloigos, OpError, ReconcileReport, Result};
use crate::apply::{ApplyReport, Scope, converge};
use crate::fleet::{
    Applied, DesiredHostState, DesiredServer, DesiredUnit, ServerOutcome, UnitOutcome,
};
use crate::plan;
use crate::store::{NewUnit, Server, Transition, Unit, UnitChange, UnitStatus};
use serde_json::json;
use std::collections::BTreeMap;
use tracing::{error, info};

/// The audit actor of what a pull changes.
const ACTOR: &str = "hub";

/// Same units on the host: same identity and shape (a different `created_at` is a new server
/// of the same name, set up from scratch).
fn same_shape(m: &Server, w: &DesiredServer) -> bool {
    m.created_at == w.created_at
        && m.cpu_ranges == w.cpu_ranges
        && m.port_base == w.port_base
        && m.ports_per_cpu == w.ports_per_cpu
        && m.uid_base == w.uid_base
}

/// Same row, but for the status (the mirror keeps READY) and `updated_at`.
fn same_row(m: &Server, w: &Server) -> bool {
    let mut a = m.clone();
    a.status = w.status;
    a.updated_at.clone_from(&w.updated_at);
    a == *w
}

/// How deep a pull goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Everything: what was applied before is checked and repaired first (drift), then every
    /// unit is brought to the hub's state, changed or not. The timer's pulls, a service's
    /// first pull and its periodic ones.
    Full,
    /// Only what the hub changed: the units whose owner differs from what this host applied,
    /// a server set up, replaced or torn down. A poke's pull: its cost does not grow with the
    /// units that did not change. (A server that is new or changed always gets the full
    /// treatment.)
    Quick,
}

/// Whether the mirror row `m` already says what the hub's `w` says of its owner.
fn mirrors(m: &Unit, w: &DesiredUnit) -> bool {
    m.status == UnitStatus::Allocated
        && m.claim == w.claim
        && m.ssh_public_key == w.ssh_public_key
        && m.tags == w.tags
        && m.allocated_by == w.allocated_by
}

/// Who a mirror unit's previous owner was, as far as the host applied it.
enum Before {
    /// Nobody (FREE, UNAVAILABLE, or no row).
    Nobody,
    /// An owner with this claim and key.
    Owner(Option<String>, String),
    /// Something half done (ALLOCATING, *_FAIL, DEALLOCATING): to release before anything.
    Unclean,
}

fn before_of(u: Option<&Unit>) -> Before {
    match u {
        None => Before::Nobody,
        Some(u) => match (u.status, &u.ssh_public_key) {
            (UnitStatus::Free | UnitStatus::Unavailable, _) => Before::Nobody,
            (UnitStatus::Allocated, Some(k)) => Before::Owner(u.claim.clone(), k.clone()),
            _ => Before::Unclean,
        },
    }
}

fn drift_of(r: &ApplyReport, drift: &mut Vec<String>) {
    drift.extend(r.written.iter().map(|p| format!("{p} rewritten")));
    drift.extend(r.removed.iter().map(|p| format!("{p} removed")));
    drift.extend(
        r.users_created
            .iter()
            .map(|u| format!("user {u} recreated")),
    );
}

fn new_unit(u: &DesiredUnit) -> NewUnit {
    NewUnit {
        compute_id: u.compute_id.clone(),
        cpu_range: u.cpu_range.clone(),
        cpu_count: u.cpu_count,
        first_cpu: u.first_cpu,
        uid: u.uid,
        user: u.user.clone(),
        ports_range: u.ports_range.clone(),
    }
}

impl Kloigos {
    /// Applies a hub's desired state to this host under the host lock (see the module). One
    /// unit that fails does not stop the others; applying the same state twice changes
    /// nothing the second time. What it moves aside is removed after the lock is released.
    pub fn apply_desired(&self, state: &DesiredHostState) -> Result<Applied> {
        self.apply_desired_as(state, Pass::Full)
    }

    /// [`Kloigos::apply_desired`] with the depth of `pass`.
    pub fn apply_desired_as(&self, state: &DesiredHostState, pass: Pass) -> Result<Applied> {
        let r = self.apply_desired_locked(state, pass);
        self.host.purge_trash();
        r
    }

    fn apply_desired_locked(&self, state: &DesiredHostState, pass: Pass) -> Result<Applied> {
        if state.hostname != self.local {
            return Err(OpError::Conflict(format!(
                "the hub sent the state of {}, but this host is {}",
                state.hostname, self.local
            )));
        }
        let _lock = self.lock()?;
        let hostname = self.local.clone();
        let mut out = Applied::default();
        let want = state.server.as_ref().filter(|s| s.is_present());
        if let Some(w) = want
            && (w.hostname != hostname || w.units.iter().any(|u| u.hostname != hostname))
        {
            return Err(OpError::Conflict(format!(
                "the hub's server is not all of host {hostname}"
            )));
        }
        let mut mirror = self
            .store
            .server(&hostname)?
            .filter(|s| plan::is_planned(s, &hostname));
        let mut prev_units = match &mirror {
            Some(_) => self.store.units_of(&hostname)?,
            None => Vec::new(),
        };
        // Gone, or a different server of the same name: take it off the host.
        if let Some(m) = &mirror
            && want.is_none_or(|w| !same_shape(m, w))
        {
            info!(hostname, operation = "pull", "tearing the server down");
            self.take_down(m, &prev_units)?;
            self.store.delete_server(&hostname)?;
            self.record(
                ACTOR,
                "decommission_server",
                None,
                Some(&hostname),
                Ok(()),
                Some(json!({"created_at": m.created_at})),
                None,
            );
            mirror = None;
            prev_units.clear();
        }
        let Some(want) = want else {
            return Ok(out);
        };
        // What was applied before, as it should be: whatever this changes is drift.
        let mut setup_failed: BTreeMap<String, String> = BTreeMap::new();
        if mirror.is_some() && pass == Pass::Full {
            let r = converge(&self.host, &self.desired(None, None)?, Scope::Full)?;
            drift_of(&r, &mut out.drift);
            setup_failed.extend(r.failed);
        }
        // The mirror's rows made equal to the hub's.
        let server = want.to_server();
        let fresh = mirror.is_none();
        let changed = mirror.as_ref().is_some_and(|m| !same_row(m, &server));
        // A server set up or replaced now: all of it is checked, whatever the pass.
        let pass = if fresh || changed { Pass::Full } else { pass };
        if fresh || changed {
            if changed {
                // Same units, other attributes (limits, address...): rows replaced, the
                // units' owners restored below from `prev_units`.
                self.store.delete_server(&hostname)?;
            }
            let units: Vec<NewUnit> = want.units.iter().map(new_unit).collect();
            if let Err(status) = self.store.begin_init(&server, &units)? {
                return Err(OpError::Conflict(format!(
                    "server {hostname} is {status} in this host's inventory"
                )));
            }
            self.store
                .set_server_status(&hostname, server.status, Some(UnitStatus::Free))?;
            for u in &prev_units {
                self.mirror_restore(u)?;
            }
            let r = converge(&self.host, &self.desired(None, None)?, Scope::Full);
            let problem = match r {
                Ok(r) => {
                    let failed: Vec<String> = r
                        .failed
                        .iter()
                        .map(|(id, e)| format!("{id}: {e}"))
                        .collect();
                    setup_failed.extend(r.failed);
                    (!failed.is_empty()).then(|| failed.join("; "))
                }
                Err(e) => Some(crate::error::Chain(&e).to_string()),
            };
            if fresh {
                self.record(
                    ACTOR,
                    "init_server",
                    None,
                    Some(&hostname),
                    problem.as_deref().map_or(Ok(()), Err),
                    None,
                    Some(json!({"hostname": hostname, "cpu_ranges": server.cpu_ranges})),
                );
            }
            if let Some(p) = problem {
                error!(hostname, operation = "pull", error = %p, "cannot set the server up");
                // The mirror stays: the next pull tears down what was made, or finishes it.
                out.server = Some(ServerOutcome {
                    created_at: want.created_at.clone(),
                    ok: false,
                    error: Some(format!("setting up {hostname} failed on the host: {p}")),
                });
                return Ok(out);
            }
        }
        out.server = Some(ServerOutcome {
            created_at: want.created_at.clone(),
            ok: true,
            error: None,
        });
        let server = self
            .store
            .server(&hostname)?
            .ok_or_else(|| OpError::NotFound(hostname.clone()))?;
        let mut fixed = ReconcileReport::default();
        for w in &want.units {
            let prev = prev_units.iter().find(|u| u.compute_id == w.compute_id);
            let outcome = self.apply_unit(&server, w, prev, &setup_failed, pass, &mut fixed)?;
            out.units.push(outcome);
        }
        out.drift.extend(fixed.units_fixed);
        if !out.drift.is_empty() {
            info!(hostname, operation = "pull", drift = ?out.drift, "repaired drift");
        }
        Ok(out)
    }

    /// One unit: its owner as the hub wants it, from what the host applied before (`prev`).
    fn apply_unit(
        &self,
        server: &Server,
        w: &DesiredUnit,
        prev: Option<&Unit>,
        setup_failed: &BTreeMap<String, String>,
        pass: Pass,
        fixed: &mut ReconcileReport,
    ) -> Result<UnitOutcome> {
        let id = w.compute_id.as_str();
        let wanted = w.owner();
        let mut outcome = UnitOutcome {
            compute_id: id.to_string(),
            claim: None,
            owned: false,
            ok: true,
            error: None,
            rolled_back: false,
        };
        let before = before_of(prev);
        let unchanged = match (&before, wanted) {
            (Before::Nobody, None) => true,
            (Before::Owner(c, k), Some((wc, wk))) => c.as_deref() == Some(wc) && k == wk,
            _ => false,
        };
        let setup_error = setup_failed.get(id).cloned();
        if unchanged {
            if wanted.is_some() {
                if pass == Pass::Full || prev.is_none_or(|p| !mirrors(p, w)) {
                    self.mirror_owned(w)?;
                }
                outcome.claim.clone_from(&w.claim);
                outcome.owned = true;
            }
            if pass == Pass::Quick {
                return Ok(outcome);
            }
            let unit = self.unit(id)?;
            let r = match setup_error {
                Some(e) => Err(OpError::Failed(e)),
                None => self.reconcile_unit(server, &unit, ACTOR, fixed),
            };
            if let Err(e) = r {
                outcome.ok = false;
                outcome.error = Some(crate::error::Chain(&e).to_string());
            }
            return Ok(outcome);
        }
        // The previous owner goes first: two owners never share files.
        if !matches!(before, Before::Nobody) {
            let unit = self.unit(id)?;
            let released = self.plan(server, &unit).and_then(|p| {
                self.host.ensure_user(&p)?;
                self.release(&p)
            });
            if let Err(e) = released {
                let e = crate::error::Chain(&e).to_string();
                error!(compute_id = id, operation = "pull", error = %e, "cannot release the previous owner");
                self.mirror_unclean(id)?;
                self.record(
                    ACTOR,
                    "deallocate",
                    Some(id),
                    Some(&server.hostname),
                    Err(&e),
                    None,
                    None,
                );
                outcome.ok = false;
                outcome.claim.clone_from(&w.claim);
                outcome.error = Some(format!("releasing {id} failed on the host: {e}"));
                return Ok(outcome);
            }
            self.mirror_free(id)?;
            self.record(
                ACTOR,
                "deallocate",
                Some(id),
                Some(&server.hostname),
                Ok(()),
                None,
                None,
            );
        }
        let Some((claim, key)) = wanted else {
            return Ok(outcome);
        };
        outcome.claim = Some(claim.to_string());
        let change = UnitChange {
            started_at: Some(w.started_at.clone()),
            tags: Some(w.tags.clone()),
            ssh_public_key: Some(Some(key.to_string())),
            allocated_by: Some(w.allocated_by.clone()),
            problem: None,
            claim: Some(w.claim.clone()),
        };
        let unit = self.step(id, UnitStatus::Free, UnitStatus::Allocating, change)?;
        let given = match setup_error {
            Some(e) => Err(OpError::Failed(e)),
            None => self.apply_allocate(&unit, key),
        };
        match given {
            Ok(()) => {
                self.step(
                    id,
                    UnitStatus::Allocating,
                    UnitStatus::Allocated,
                    UnitChange::default(),
                )?;
                self.record(
                    ACTOR,
                    "allocate",
                    Some(id),
                    Some(&server.hostname),
                    Ok(()),
                    None,
                    Some(json!({"claim": claim})),
                );
                outcome.owned = true;
            }
            Err(e) => {
                let e = crate::error::Chain(&e).to_string();
                error!(compute_id = id, operation = "pull", error = %e, "cannot give the unit to its owner");
                let undone = self.plan(server, &unit).and_then(|p| self.release(&p));
                outcome.ok = false;
                outcome.error = Some(format!("allocation of {id} failed on the host: {e}"));
                match undone {
                    Ok(()) => {
                        self.step(
                            id,
                            UnitStatus::Allocating,
                            UnitStatus::Free,
                            UnitChange::cleared(),
                        )?;
                        outcome.rolled_back = true;
                    }
                    Err(re) => {
                        self.step(
                            id,
                            UnitStatus::Allocating,
                            UnitStatus::AllocationFail,
                            UnitChange::default(),
                        )?;
                        if let Some(msg) = &mut outcome.error {
                            msg.push_str(&format!(
                                "; rollback failed: {}",
                                crate::error::Chain(&re)
                            ));
                        }
                    }
                }
                self.record(
                    ACTOR,
                    "allocate",
                    Some(id),
                    Some(&server.hostname),
                    Err(outcome.error.as_deref().unwrap_or("failed")),
                    None,
                    Some(json!({"claim": claim})),
                );
            }
        }
        Ok(outcome)
    }

    /// One compare-and-set move of a mirror unit; any other outcome is an error.
    fn step(&self, id: &str, from: UnitStatus, to: UnitStatus, change: UnitChange) -> Result<Unit> {
        match self.store.transition(id, &[from], to, change)? {
            Transition::Done(u) => Ok(*u),
            Transition::NotFound => {
                Err(OpError::NotFound(format!("compute unit {id:?} not found")))
            }
            Transition::WrongState(s) => Err(OpError::Failed(format!(
                "{id} is {s} in this host's inventory, not {from}"
            ))),
        }
    }

    /// The mirror row of a released unit: FREE, cleared.
    fn mirror_free(&self, id: &str) -> Result<()> {
        let u = self.unit(id)?;
        let path: &[UnitStatus] = match u.status {
            UnitStatus::Free | UnitStatus::Unavailable => &[],
            UnitStatus::Allocated => &[UnitStatus::Deallocating, UnitStatus::Free],
            UnitStatus::Allocating
            | UnitStatus::AllocationFail
            | UnitStatus::Deallocating
            | UnitStatus::DeallocationFail => &[UnitStatus::Free],
        };
        let mut from = u.status;
        for to in path {
            let change = if *to == UnitStatus::Free {
                UnitChange::cleared()
            } else {
                UnitChange::default()
            };
            self.step(id, from, *to, change)?;
            from = *to;
        }
        Ok(())
    }

    /// The mirror row of a unit whose release failed: a failed state, so the next pull (or a
    /// reconcile) releases it again.
    fn mirror_unclean(&self, id: &str) -> Result<()> {
        use UnitStatus::*;
        let u = self.unit(id)?;
        let path: &[UnitStatus] = match u.status {
            Allocated => &[Deallocating, DeallocationFail],
            Free => &[Allocating, AllocationFail],
            Allocating => &[AllocationFail],
            Deallocating => &[DeallocationFail],
            AllocationFail | DeallocationFail | Unavailable => &[],
        };
        let mut from = u.status;
        for to in path {
            self.step(id, from, *to, UnitChange::default())?;
            from = *to;
        }
        Ok(())
    }

    /// The mirror row of a unit whose owner is unchanged on the host: ALLOCATED with the hub's
    /// claim, key, tags and actor (rows replaced by a changed server come back FREE).
    fn mirror_owned(&self, w: &DesiredUnit) -> Result<()> {
        let id = w.compute_id.as_str();
        if mirrors(&self.unit(id)?, w) {
            return Ok(());
        }
        self.mirror_free(id)?;
        let change = UnitChange {
            started_at: Some(w.started_at.clone()),
            tags: Some(w.tags.clone()),
            ssh_public_key: Some(w.ssh_public_key.clone()),
            allocated_by: Some(w.allocated_by.clone()),
            problem: None,
            claim: Some(w.claim.clone()),
        };
        self.step(id, UnitStatus::Free, UnitStatus::Allocating, change)?;
        self.step(
            id,
            UnitStatus::Allocating,
            UnitStatus::Allocated,
            UnitChange::default(),
        )?;
        Ok(())
    }

    /// A replaced mirror row (FREE) put back as the host applied it before.
    fn mirror_restore(&self, prev: &Unit) -> Result<()> {
        match before_of(Some(prev)) {
            Before::Nobody => Ok(()),
            Before::Unclean => self.mirror_unclean(&prev.compute_id),
            Before::Owner(..) => {
                let change = UnitChange {
                    started_at: Some(prev.started_at.clone()),
                    tags: Some(prev.tags.clone()),
                    ssh_public_key: Some(prev.ssh_public_key.clone()),
                    allocated_by: Some(prev.allocated_by.clone()),
                    problem: None,
                    claim: Some(prev.claim.clone()),
                };
                let id = prev.compute_id.as_str();
                self.step(id, UnitStatus::Free, UnitStatus::Allocating, change)?;
                self.step(
                    id,
                    UnitStatus::Allocating,
                    UnitStatus::Allocated,
                    UnitChange::default(),
                )?;
                Ok(())
            }
        }
    }
}
