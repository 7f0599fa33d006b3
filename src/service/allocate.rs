//! Allocation and deallocation of a unit: the owner's key, lingering, and the release that
//! leaves the unit as nobody's (processes ended, directories back to the skeleton).

use super::{Allocate, Begun, Kloigos, Move, Op, OpError, Result, test_pause, unit_json};
use crate::apply::{Scope, converge};
use crate::render::UnitPlan;
use crate::store::{Claim, Transition, Unit, UnitChange, UnitStatus};
use serde_json::json;
use std::time::Duration;
use tracing::info;

/// How long the list of servers that allocations start from is kept.
const PLACEMENT_REFRESH: std::time::Duration = std::time::Duration::from_secs(10);

impl Kloigos {
    // ---- allocate ----------------------------------------------------------------------

    /// Allocates a FREE unit; what a failed allocation's release moved aside is removed after
    /// the host lock is released.
    /// A unit of a joined host is refused here (it needs a hub's wait: see
    /// [`Kloigos::allocate_begin`]).
    pub fn allocate(&self, req: Allocate, actor: &str) -> Result<Unit> {
        match self.allocate_begin(req, actor)? {
            Begun::Done(u) => Ok(u),
            Begun::Remote(u) => {
                let msg = format!(
                    "{} is on joined host {}: allocate through a hub's API",
                    u.compute_id, u.hostname
                );
                self.release_claim(&u, &msg)?;
                Err(OpError::Conflict(msg))
            }
        }
    }

    /// Claims a unit; on this host (or an inventory-only server) allocates it completely. A
    /// unit of a joined host is left ALLOCATING with its claim (`Begun::Remote`): the caller
    /// pokes the host and waits for its report, holding no lock.
    pub fn allocate_begin(&self, req: Allocate, actor: &str) -> Result<Begun<Unit>> {
        let r = self.allocate_locked(req, actor);
        self.host.purge_trash();
        r
    }

    /// Where an allocation starts its pick (see `Claim::start_at`): a random server's
    /// hostname, from a list read again when it is older than [`PLACEMENT_REFRESH`], so that
    /// allocations spread over the hosts (one host applies its changes one pull at a time).
    fn placement_start(&self) -> Result<Option<String>> {
        if self.placement == super::Placement::Pack {
            return Ok(None);
        }
        let mut cached = self.spread_from.lock().unwrap_or_else(|p| p.into_inner());
        let stale = cached
            .as_ref()
            .is_none_or(|(at, _)| at.elapsed() >= PLACEMENT_REFRESH);
        if stale {
            let mut names: Vec<String> = self
                .store
                .servers()?
                .into_iter()
                .filter(|s| s.status == crate::store::ServerStatus::Ready)
                .map(|s| s.hostname)
                .collect();
            names.sort();
            *cached = Some((std::time::Instant::now(), names));
        }
        let names = cached
            .as_ref()
            .map(|(_, n)| n.as_slice())
            .unwrap_or_default();
        if names.len() < 2 {
            return Ok(None);
        }
        let mut r = [0u8; 8];
        if getrandom::fill(&mut r).is_err() {
            return Ok(None);
        }
        let i = usize::try_from(u64::from_le_bytes(r) % names.len() as u64).unwrap_or(0);
        Ok(names.get(i).cloned())
    }

    fn allocate_locked(&self, req: Allocate, actor: &str) -> Result<Begun<Unit>> {
        let _lock = self.lock()?;
        let key = req.ssh_key.to_line();
        let reported_since = crate::time::ago(self.host_stale_after);
        let start = self.placement_start()?;
        let Some(unit) = self.store.claim_free(&Claim {
            cpu_count: req.cpu_count,
            region: req.region.as_deref(),
            zone: req.zone.as_deref(),
            tags: req.tags.as_ref(),
            ssh_public_key: &key,
            actor,
            inventory_only: req.inventory_only,
            local_hostname: &self.local,
            reported_since: &reported_since,
            start_at: start.as_deref(),
        })?
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
        if !req.inventory_only && !self.is_local(&unit.hostname) {
            return Ok(Begun::Remote(unit));
        }
        let applied = if self.is_local(&unit.hostname) {
            self.apply_allocate(&unit, &key)
        } else {
            Ok(())
        };
        let op = Op {
            actor,
            operation: "allocate",
            compute_id: Some(&id),
            hostname: &unit.hostname,
            before: Some(json!({"status": "FREE"})),
        };
        let done = Move {
            from: &[UnitStatus::Allocating],
            to: UnitStatus::Allocated,
            change: UnitChange {
                started_at: Some(Some(crate::time::now())),
                ..Default::default()
            },
        };
        self.conclude_move(op, &unit, applied, done, |e| {
                let e = crate::error::Chain(e);
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
                let mv = Move {
                    from: &[UnitStatus::Allocating],
                    to,
                    change,
                };
                Ok((msg, mv))
            })
            .map(Begun::Done)
    }

    pub(super) fn apply_allocate(&self, unit: &Unit, key: &str) -> Result<()> {
        let server = self
            .store
            .server(&unit.hostname)?
            .ok_or_else(|| OpError::NotFound(unit.hostname.clone()))?;
        let plan = self.plan(&server, unit)?;
        let t0 = std::time::Instant::now();
        self.host.write_authorized_key(&plan, key)?;
        let t1 = std::time::Instant::now();
        test_pause("allocate");
        // tmpfiles.d now carries the linger flag; the drop-ins do not change (no reload).
        converge(&self.host, &self.desired(None, None)?, Scope::Files)?;
        let t2 = std::time::Instant::now();
        self.host.set_linger(&plan, true)?;
        let us = |d: std::time::Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        tracing::info!(
            compute_id = %unit.compute_id,
            key_us = us(t1 - t0),
            files_us = us(t2 - t1),
            linger_us = us(t2.elapsed()),
            "allocation applied"
        );
        Ok(())
    }

    /// Host side of "nobody owns this unit": linger off, every process gone, key removed,
    /// leftovers removed, directories back to the skeleton (filled from /etc/skel only now,
    /// after the kill), tmpfiles.d without linger.
    pub(super) fn release(&self, plan: &UnitPlan) -> Result<()> {
        let mut plan = plan.clone();
        plan.allocated = false;
        // tmpfiles.d without the linger flag first: recreating the skeleton below runs
        // systemd-tmpfiles on that file, which would otherwise bring the flag back.
        converge(
            &self.host,
            &self.desired(None, Some(&plan.compute_id))?,
            Scope::Files,
        )?;
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
        Ok(self.host.end_ownership(plan, self.kill_grace)?)
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
        match self.deallocate_begin(id, actor, check)? {
            Begun::Done(_) => Ok(()),
            Begun::Remote(u) => Err(OpError::Conflict(format!(
                "{} is on joined host {}: it is DEALLOCATING; a hub finishes it when the host reports",
                u.compute_id, u.hostname
            ))),
        }
    }

    /// Deallocates a unit of this host (or of an inventory-only server) completely; a unit of
    /// a joined host is left DEALLOCATING (`Begun::Remote`, with the time of that move in
    /// `updated_at`) for the caller to poke the host and wait.
    pub fn deallocate_begin(
        &self,
        id: &str,
        actor: &str,
        check: &dyn Fn(&Unit) -> Result<()>,
    ) -> Result<Begun<Unit>> {
        let r = self.deallocate_locked(id, actor, check);
        self.host.purge_trash();
        r
    }

    fn deallocate_locked(
        &self,
        id: &str,
        actor: &str,
        check: &dyn Fn(&Unit) -> Result<()>,
    ) -> Result<Begun<Unit>> {
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
        if let Some(server) = self.store.server(&unit.hostname)?
            && self.is_remote(&server)
        {
            return Ok(Begun::Remote(unit));
        }
        let applied = if self.is_local(&unit.hostname) {
            self.store
                .server(&unit.hostname)?
                .ok_or_else(|| OpError::NotFound(unit.hostname.clone()))
                .and_then(|s| self.plan(&s, &unit))
                .and_then(|p| self.release(&p))
        } else {
            Ok(())
        };
        let op = Op {
            actor,
            operation: "deallocate",
            compute_id: Some(id),
            hostname: &unit.hostname,
            before: Some(unit_json(&before)),
        };
        let done = Move {
            from: &[UnitStatus::Deallocating],
            to: UnitStatus::Free,
            change: UnitChange::cleared(),
        };
        self.conclude_move(op, &unit, applied, done, |e| {
            let e = crate::error::Chain(e);
            let msg = format!(
                "deallocation of {id} failed on the host: {e} (unit is DEALLOCATION_FAIL; retry deallocate)"
            );
            let mv = Move {
                from: &[UnitStatus::Deallocating],
                to: UnitStatus::DeallocationFail,
                change: UnitChange::default(),
            };
            Ok((msg, mv))
        })
        .map(Begun::Done)
    }
}
