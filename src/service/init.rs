//! Initializing a server: its units planned from the request (names, UIDs, ports), recorded
//! as INITIALIZING, applied to the host when it is this one, then READY; a failure rolls back
//! what was created.

use super::{
    Begun, InitServer, Invalid, InvalidList, Kloigos, LocPart, OpError, Result, all_ok, test_pause,
};
use crate::model::{self, names};
use crate::store::{NewUnit, Server, ServerStatus, UnitStatus};
use serde_json::json;
use tracing::{error, info};

impl Kloigos {
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
        // This host's facts from its /sys and /proc; a joined host's from what it reported;
        // an inventory-only server is recorded as given.
        let (online, ephemeral) = if self.is_local(&req.hostname) {
            (
                model::numa::online_cpus(self.host.root()),
                model::ports::ephemeral_range(self.host.root()).map(|(lo, _)| lo),
            )
        } else if req.inventory_only {
            (None, None)
        } else {
            let f = self.remote_facts(&req.hostname)?;
            (f.online, f.ephemeral_low)
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
        match self.init_server_begin(req, actor)? {
            Begun::Done(_) => Ok(()),
            Begun::Remote(s) => {
                self.store.delete_server(&s.hostname)?;
                Err(OpError::Conflict(format!(
                    "{} is a joined host: initialize it through a hub's API",
                    s.hostname
                )))
            }
        }
    }

    /// Initializes a server of this host (or records an inventory-only one) completely; a
    /// joined host's is recorded INITIALIZING (`Begun::Remote`) for the caller to poke the host
    /// and wait for its report.
    pub fn init_server_begin(&self, req: InitServer, actor: &str) -> Result<Begun<Server>> {
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
            inventory_only: req.inventory_only,
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
        if !self.is_local(&req.hostname) && !req.inventory_only {
            info!(hostname = %req.hostname, operation = "init_server", units = units.len(), "recorded; the host applies it");
            return Ok(Begun::Remote(server));
        }
        test_pause("init_server");
        let after = json!({"hostname": server.hostname, "cpu_ranges": server.cpu_ranges});
        if self.is_local(&req.hostname) {
            info!(hostname = %req.hostname, operation = "init_server", units = units.len(), "applying");
            if let Err(e) = self.apply_local(None).and_then(all_ok) {
                let e = crate::error::Chain(&e);
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
        Ok(Begun::Done(server))
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
}
