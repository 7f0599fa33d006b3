//! Planning and rendering: from inventory rows to the exact text of every file Kloigos owns on a
//! host. Pure: nothing here touches the host, so every output is golden-tested.
//!
//! Templates are layered file by file: the copies built into the binary, then each directory of
//! `--templates` in order (by default `/usr/lib/kloigos/templates`, then `/etc/kloigos/templates`);
//! a later layer's file of the same name wins.

use crate::model::{self, CpuList, PortRanges, names, validate};
use crate::store::{Limits, Server, Unit, UnitStatus};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

const BUILTIN: [(&str, &str); 4] = [
    ("slice.conf", include_str!("../templates/slice.conf")),
    (
        "user-service.conf",
        include_str!("../templates/user-service.conf"),
    ),
    ("tmpfiles.conf", include_str!("../templates/tmpfiles.conf")),
    ("nftables.nft", include_str!("../templates/nftables.nft")),
];

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("template {name}: {source}")]
    Template {
        name: String,
        #[source]
        source: tera::Error,
    },
    #[error("cannot read template {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("refusing to render unsafe value {value:?} for {field}")]
    Unsafe { field: &'static str, value: String },
    #[error(transparent)]
    Model(#[from] model::ModelError),
}

/// Host-wide facts the templates may use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFacts {
    pub hostname: String,
    /// systemd enforces `SocketBindAllow=` (built with `+BPF_FRAMEWORK`).
    pub socket_bind: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    pub first: u16,
    pub last: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dirs {
    pub opt: String,
    pub mnt: String,
    pub home: String,
}

/// Limits resolved for one unit (per-CPU amounts multiplied out).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitLimits {
    pub memory_max: Option<u64>,
    pub memory_high: Option<u64>,
    pub tasks_max: Option<u64>,
    pub io_weight: Option<u64>,
    pub io_read_bandwidth_max: Vec<String>,
    pub io_write_bandwidth_max: Vec<String>,
}

/// Everything known about one unit on its host, ready for the templates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitPlan {
    pub compute_id: String,
    pub hostname: String,
    pub user: String,
    pub uid: u32,
    pub cpu_range: String,
    /// systemd form of the CPU list (no strides).
    pub cpus: String,
    pub cpu_count: usize,
    /// NUMA nodes of those CPUs, systemd form; None when the host exposes no NUMA info.
    pub memory_nodes: Option<String>,
    pub ports: Vec<Span>,
    pub ports_range: String,
    pub dirs: Dirs,
    /// Allocated to an owner: lingering on, authorized key present.
    pub allocated: bool,
    pub limits: UnitLimits,
}

/// One file to write, relative to the root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedFile {
    pub path: PathBuf,
    pub content: String,
    pub mode: u32,
}

impl UnitPlan {
    /// Plans a unit from its row and the host's NUMA topology (`model::numa::topology`, read
    /// once by the caller: this function touches nothing).
    pub fn new(
        server: &Server,
        unit: &Unit,
        topology: &[(u32, CpuList)],
    ) -> Result<UnitPlan, RenderError> {
        let cpus: CpuList = unit.cpu_range.parse()?;
        let ports: PortRanges = unit.ports_range.parse()?;
        let nodes: std::collections::BTreeSet<u32> = topology
            .iter()
            .filter(|(_, node_cpus)| node_cpus.overlaps(&cpus))
            .map(|&(node, _)| node)
            .collect();
        let memory_nodes = Some(nodes)
            .filter(|n| !n.is_empty())
            .map(|nodes| {
                CpuList::from_cpus(nodes)
                    .map(|l| l.to_ranges())
                    .map_err(RenderError::from)
            })
            .transpose()?;
        let dir = names::dir_name(&cpus);
        let plan = UnitPlan {
            compute_id: unit.compute_id.clone(),
            hostname: unit.hostname.clone(),
            user: unit.user.clone(),
            uid: unit.uid,
            cpu_range: cpus.to_string(),
            cpus: cpus.to_ranges(),
            cpu_count: cpus.len(),
            memory_nodes,
            ports: ports
                .0
                .iter()
                .map(|&(first, last)| Span { first, last })
                .collect(),
            ports_range: ports.to_string(),
            dirs: Dirs {
                opt: format!("/opt/{dir}"),
                mnt: format!("/mnt/{dir}"),
                home: format!("/home/{}", unit.user),
            },
            allocated: matches!(
                unit.status,
                UnitStatus::Allocated | UnitStatus::Allocating | UnitStatus::AllocationFail
            ),
            limits: resolve_limits(&server.limits, cpus.len() as u64),
        };
        plan.check()?;
        Ok(plan)
    }

    /// Defence in depth: every value was validated on the way in, but nothing that could break
    /// out of a line or a token of a unit file, tmpfiles.d line or nft statement is rendered.
    pub fn check(&self) -> Result<(), RenderError> {
        fn safe(field: &'static str, v: &str) -> Result<(), RenderError> {
            let ok = !v.is_empty()
                && v.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.,:/ ".contains(c));
            if ok {
                Ok(())
            } else {
                Err(RenderError::Unsafe {
                    field,
                    value: v.to_string(),
                })
            }
        }
        validate::hostname(&self.hostname).map_err(|_| RenderError::Unsafe {
            field: "hostname",
            value: self.hostname.clone(),
        })?;
        safe("compute_id", &self.compute_id)?;
        safe("user", &self.user)?;
        if self.user.contains([' ', '/', ',', ':']) {
            return Err(RenderError::Unsafe {
                field: "user",
                value: self.user.clone(),
            });
        }
        for d in [&self.dirs.opt, &self.dirs.mnt, &self.dirs.home] {
            safe("directory", d)?;
            if d.contains([' ', ',', ':']) || d.contains("..") {
                return Err(RenderError::Unsafe {
                    field: "directory",
                    value: d.clone(),
                });
            }
        }
        for e in self
            .limits
            .io_read_bandwidth_max
            .iter()
            .chain(&self.limits.io_write_bandwidth_max)
        {
            validate_io_limit(e).map_err(|_| RenderError::Unsafe {
                field: "io limit",
                value: e.clone(),
            })?;
        }
        Ok(())
    }
}

fn resolve_limits(l: &Limits, cpus: u64) -> UnitLimits {
    UnitLimits {
        memory_max: l.memory_max_per_cpu.map(|m| m.saturating_mul(cpus)),
        memory_high: l.memory_high_per_cpu.map(|m| m.saturating_mul(cpus)),
        tasks_max: l.tasks_max,
        io_weight: l.io_weight,
        io_read_bandwidth_max: l.io_read_bandwidth_max.clone(),
        io_write_bandwidth_max: l.io_write_bandwidth_max.clone(),
    }
}

/// `DEVICE BYTES` as systemd's `IO*BandwidthMax=` takes it: an absolute /dev path and a size
/// with an optional K, M, G or T suffix.
pub fn validate_io_limit(s: &str) -> Result<(), String> {
    let mut parts = s.split(' ');
    let (Some(dev), Some(size), None) = (parts.next(), parts.next(), parts.next()) else {
        return Err(format!(
            "{s:?}: expected 'DEVICE BYTES', e.g. '/dev/vda 50M'"
        ));
    };
    let dev_ok = dev.starts_with("/dev/")
        && dev.len() > 5
        && !dev.contains("..")
        && dev
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/_.-".contains(c));
    let digits = size.trim_end_matches(['K', 'M', 'G', 'T']);
    let size_ok = !digits.is_empty()
        && digits.len() + 1 >= size.len()
        && digits.chars().all(|c| c.is_ascii_digit())
        && digits.len() <= 18;
    if dev_ok && size_ok {
        Ok(())
    } else {
        Err(format!(
            "{s:?}: expected 'DEVICE BYTES', e.g. '/dev/vda 50M'"
        ))
    }
}

pub struct Renderer {
    tera: tera::Tera,
    /// Where each template came from, for `kloigos render --explain` and error messages.
    pub sources: Vec<(String, String)>,
}

impl Renderer {
    /// Builds the layered template set: built-ins, then each existing directory in order.
    pub fn load(dirs: &[PathBuf]) -> Result<Renderer, RenderError> {
        let mut tera = tera::Tera::default();
        tera.autoescape_on(vec![]);
        let mut sources = Vec::new();
        for (name, text) in BUILTIN {
            let mut chosen = (text.to_string(), "built-in".to_string());
            for dir in dirs {
                let path = dir.join(name);
                match std::fs::read_to_string(&path) {
                    Ok(t) => chosen = (t, path.display().to_string()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(source) => return Err(RenderError::Read { path, source }),
                }
            }
            tera.add_raw_template(name, &chosen.0)
                .map_err(|source| RenderError::Template {
                    name: format!("{name} ({})", chosen.1),
                    source,
                })?;
            sources.push((name.to_string(), chosen.1));
        }
        Ok(Renderer { tera, sources })
    }

    fn render(&self, name: &str, ctx: &tera::Context) -> Result<String, RenderError> {
        let mut out = self
            .tera
            .render(name, ctx)
            .map_err(|source| RenderError::Template {
                name: name.to_string(),
                source,
            })?;
        if !out.ends_with('\n') {
            out.push('\n');
        }
        Ok(out)
    }

    /// The generator's two drop-ins of a unit (slice, user@), paths relative to the
    /// generator's output directory.
    pub fn dropins(
        &self,
        host: &HostFacts,
        plan: &UnitPlan,
    ) -> Result<Vec<RenderedFile>, RenderError> {
        [
            ("slice.conf", crate::plan::slice_dropin(plan.uid)),
            (
                "user-service.conf",
                crate::plan::user_service_dropin(plan.uid),
            ),
        ]
        .into_iter()
        .map(|(template, path)| {
            let mut f = self.unit_file(host, plan, template, path)?;
            // Every generated file names its maker, even from an admin's template.
            if !f.content.starts_with(crate::plan::HEADER_PREFIX) {
                f.content = format!(
                    "{} (kloigos-generator, from /{}): do not edit.\n{}",
                    crate::plan::HEADER_PREFIX,
                    crate::plan::STATE_PATH,
                    f.content
                );
            }
            Ok(f)
        })
        .collect()
    }

    /// The unit's tmpfiles.d file (service-written).
    pub fn tmpfiles(&self, host: &HostFacts, plan: &UnitPlan) -> Result<RenderedFile, RenderError> {
        self.unit_file(host, plan, "tmpfiles.conf", plan.tmpfiles_conf())
    }

    fn unit_file(
        &self,
        host: &HostFacts,
        plan: &UnitPlan,
        template: &str,
        path: PathBuf,
    ) -> Result<RenderedFile, RenderError> {
        let mut ctx = tera::Context::new();
        ctx.insert("unit", plan);
        ctx.insert("host", host);
        Ok(RenderedFile {
            path,
            content: self.render(template, &ctx)?,
            mode: 0o644,
        })
    }

    /// The whole `inet kloigos` table for the units of this host.
    pub fn nftables(
        &self,
        host: &HostFacts,
        units: &[UnitPlan],
    ) -> Result<RenderedFile, RenderError> {
        let mut ctx = tera::Context::new();
        ctx.insert("units", units);
        ctx.insert("host", host);
        Ok(RenderedFile {
            path: PathBuf::from(crate::plan::NFT_PATH),
            content: self.render("nftables.nft", &ctx)?,
            mode: 0o644,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_limits() {
        for ok in [
            "/dev/vda 50M",
            "/dev/disk/by-id/nvme-X_1 100",
            "/dev/sda 1T",
        ] {
            assert_eq!(validate_io_limit(ok), Ok(()), "{ok}");
        }
        for bad in [
            "/dev/vda",
            "/dev/vda 50M extra",
            "vda 50M",
            "/dev/ 5",
            "/dev/../etc/passwd 5",
            "/dev/vda 5MM",
            "/dev/vda M",
            "/dev/vda\n5M",
            "/dev/vda 5m",
            "/dev/vda  5M",
        ] {
            assert!(validate_io_limit(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn later_layer_wins_file_by_file() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        std::fs::write(a.path().join("slice.conf"), "A {{ unit.user }}").unwrap();
        std::fs::write(b.path().join("slice.conf"), "B {{ unit.user }}").unwrap();
        std::fs::write(a.path().join("tmpfiles.conf"), "T").unwrap();
        let r = Renderer::load(&[a.path().into(), b.path().into()]).unwrap();
        let src: std::collections::HashMap<_, _> = r.sources.iter().cloned().collect();
        assert!(src["slice.conf"].starts_with(&b.path().display().to_string()));
        assert!(src["tmpfiles.conf"].starts_with(&a.path().display().to_string()));
        assert_eq!(src["nftables.nft"], "built-in");
        // A broken override is reported with where it came from.
        std::fs::write(b.path().join("nftables.nft"), "{% if %}").unwrap();
        let err = Renderer::load(&[a.path().into(), b.path().into()])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("nftables.nft"), "{err}");
    }
}
