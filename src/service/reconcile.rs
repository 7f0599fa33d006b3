//! Reconcile: re-render everything from the inventory, finish or roll back what a crash left
//! half-done, repair drift.

use super::{Kloigos, OpError, ReconcileReport, Result, unit_json};
use crate::apply::{Scope, converge};
use crate::store::{Server, ServerStatus, Transition, Unit, UnitChange, UnitStatus};
use serde_json::json;
use tracing::{error, info};

impl Kloigos {
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
        self.adopt_unjoined(actor, &mut report)?;
        // Servers half decommissioned: finish the job first, so their units are not re-rendered.
        for server in self.store.servers_in(&[ServerStatus::Decommissioning])? {
            // A joined host's servers are its hub's sweep's (from the host's reports).
            if server.status == ServerStatus::Decommissioning && !self.is_remote(&server) {
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
        let desired = self.desired(None, None)?;
        if let Err(e) = self.host.find_trash(&desired.plans) {
            error!(error = %crate::error::Chain(&e), "cannot look for old files to remove");
        }
        // Every file, user, directory and the table as the inventory says...
        let applied = converge(&self.host, &desired, Scope::Full)?;
        report.files_changed.extend(applied.written);
        report.files_removed.extend(applied.removed);
        let setup_failed: std::collections::BTreeMap<String, String> =
            applied.failed.into_iter().collect();
        // ...then each unit's ownership: keys, lingering, operations a crash cut short. Every
        // unit of this host's server; elsewhere (inventory-only servers) only what an
        // operation left half-done or marked, which the database finds by an index.
        let local = self.store.server(&self.local)?;
        let mut todo: Vec<(Server, Vec<Unit>)> = Vec::new();
        if let Some(server) = local {
            let units = self.store.units_of(&server.hostname)?;
            todo.push((server, units));
        }
        for unit in self.store.units_unsettled()? {
            if self.is_local(&unit.hostname) {
                continue;
            }
            match todo.last_mut() {
                Some((s, units)) if s.hostname == unit.hostname => units.push(unit),
                _ => {
                    if let Some(server) = self.store.server(&unit.hostname)? {
                        todo.push((server, vec![unit]));
                    }
                }
            }
        }
        for (server, units) in todo {
            if !matches!(
                server.status,
                ServerStatus::Initializing | ServerStatus::Ready
            ) || self.is_remote(&server)
            {
                continue;
            }
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
        for server in self.store.servers_in(&[ServerStatus::Initializing])? {
            if !self.is_remote(&server) {
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

    /// Servers of other hosts that never joined were inventory-only without saying so before
    /// the fleet (an inventory from an earlier version): they are marked so, explicitly, as
    /// init_server now requires. Without it their units would never be chosen and their
    /// deallocation would wait for a host that will never report.
    fn adopt_unjoined(&self, actor: &str, report: &mut ReconcileReport) -> Result<()> {
        for server in self.store.unjoined_servers(&self.local)? {
            self.store.set_inventory_only(&server.hostname, true)?;
            report.servers_fixed.push(format!(
                "{}: marked inventory-only (never joined)",
                server.hostname
            ));
            self.record(
                actor,
                "reconcile",
                None,
                Some(&server.hostname),
                Ok(()),
                Some(json!({"inventory_only": false})),
                Some(json!({"inventory_only": true})),
            );
        }
        Ok(())
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
                let e = crate::error::Chain(&e);
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

    pub(super) fn reconcile_unit(
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
}
