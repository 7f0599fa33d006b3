//! Retiring a server: its units taken off the host, the server kept as DECOMMISSIONED.

use super::{Begun, Kloigos, Op, OpError, Result, all_ok};
use crate::store::{Server, ServerStatus, Unit, UnitStatus};
use serde_json::json;
use tracing::info;

impl Kloigos {
    // ---- decommission ------------------------------------------------------------------

    /// Retires a server; its units' files are removed after the host lock is released.
    pub fn decommission(&self, hostname: &str, force: bool, actor: &str) -> Result<()> {
        match self.decommission_begin(hostname, force, actor)? {
            Begun::Done(_) => Ok(()),
            Begun::Remote(_) => Err(OpError::Conflict(format!(
                "{hostname} is a joined host: it is DECOMMISSIONING; a hub finishes it when the host reports"
            ))),
        }
    }

    /// Decommissions a server of this host (or an inventory-only one) completely; a joined
    /// host's goes DECOMMISSIONING (`Begun::Remote` with the server as recorded then) for the
    /// caller to poke the host and wait for its report.
    pub fn decommission_begin(
        &self,
        hostname: &str,
        force: bool,
        actor: &str,
    ) -> Result<Begun<Server>> {
        let r = self.decommission_locked(hostname, force, actor);
        self.host.purge_trash();
        r
    }

    fn decommission_locked(
        &self,
        hostname: &str,
        force: bool,
        actor: &str,
    ) -> Result<Begun<Server>> {
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
        if self.is_remote(&server) {
            info!(
                hostname,
                operation = "decommission_server",
                actor,
                force,
                "recorded; the host tears it down"
            );
            let now = self
                .store
                .server(hostname)?
                .ok_or_else(|| OpError::NotFound(format!("server {hostname:?} not found")))?;
            return Ok(Begun::Remote(now));
        }
        info!(
            hostname,
            operation = "decommission_server",
            actor,
            force,
            "decommissioning"
        );
        let op = Op {
            actor,
            operation: "decommission_server",
            compute_id: None,
            hostname,
            before: Some(json!({"status": server.status, "units_in_use": busy})),
        };
        self.conclude(
            op,
            self.finish_decommission(&server, &units),
            || Ok((Begun::Done(server.clone()), Some(json!({"status": "DECOMMISSIONED"})))),
            |e| {
                let e = crate::error::Chain(e);
                let msg = format!(
                    "decommission of {hostname} failed on the host: {e} (server is DECOMMISSION_FAIL; retry)"
                );
                self.store
                    .set_server_status(hostname, ServerStatus::DecommissionFail, None)?;
                Ok((msg, Some(json!({"status": "DECOMMISSION_FAIL"}))))
            },
        )
    }

    pub(super) fn finish_decommission(&self, server: &Server, units: &[Unit]) -> Result<()> {
        if self.is_local(&server.hostname) {
            self.take_down(server, units)?;
        }
        self.store
            .retire_server(&server.hostname, ServerStatus::Decommissioned)?;
        Ok(())
    }

    /// Takes a server's units off this host (processes, files, users) and brings the rest of
    /// the host in line without them; the inventory is not changed.
    pub(super) fn take_down(&self, server: &Server, units: &[Unit]) -> Result<()> {
        let plans = units
            .iter()
            .map(|u| self.plan(server, u))
            .collect::<Result<Vec<_>>>()?;
        self.host.teardown(&plans, self.kill_grace)?;
        all_ok(self.apply_local(Some(&server.hostname))?)
    }
}
