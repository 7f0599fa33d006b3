//! The one applier: brings a [`Host`] to a [`Desired`] state and says what it changed, and the
//! teardown of units, which keeps going after an error and returns them all.

use super::{ApplyError, Host, Result};
use crate::error::Chain;
use crate::plan::{self, Desired};
use crate::render::{RenderedFile, UnitPlan};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How much of the desired state to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The files only: state file (and the generator's drop-ins), tmpfiles.d, nftables, legacy
    /// drop-ins. What allocation and release change.
    Files,
    /// Users first, then the files, then every unit's directories (init, reconcile,
    /// decommission).
    Full,
}

/// What [`converge`] changed (root-relative paths).
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ApplyReport {
    pub written: Vec<String>,
    pub removed: Vec<String>,
    pub users_created: Vec<String>,
    /// Units whose directories were checked and made where missing.
    pub dirs_made: Vec<String>,
    pub nft_reloaded: bool,
    /// systemd reloaded (on a fake root: the generator run in-process).
    pub daemon_reloaded: bool,
    /// Units that could not be set up, `(compute_id, why)`: one does not stop the others.
    pub failed: Vec<(String, String)>,
}

/// One unit's teardown error.
#[derive(Debug)]
pub struct UnitError {
    pub compute_id: String,
    pub error: ApplyError,
}

/// Every error of a teardown, in the style of netavark's `NetavarkErrorList`: Display lists
/// them all, each with its causes.
#[derive(Debug)]
pub struct ErrorList(pub Vec<UnitError>);

impl fmt::Display for ErrorList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.as_slice() {
            [one] => write!(f, "{}: {}", one.compute_id, Chain(&one.error)),
            many => {
                write!(f, "{} errors:", many.len())?;
                for e in many {
                    write!(f, " [{}: {}]", e.compute_id, Chain(&e.error))?;
                }
                Ok(())
            }
        }
    }
}

/// Each error's causes are in the list's own message, so it has no single `source()`.
impl std::error::Error for ErrorList {}

fn rel(p: impl AsRef<Path>) -> String {
    p.as_ref().display().to_string()
}

/// Brings `host` to `desired`. Errors of the host-wide files stop it; a unit whose user or
/// directories cannot be set up is listed in `failed` and the others carry on.
pub fn converge(host: &Host, desired: &Desired, scope: Scope) -> Result<ApplyReport> {
    let mut report = ApplyReport::default();
    if scope == Scope::Full {
        for p in &desired.plans {
            match host.ensure_user(p) {
                Ok(true) => report.users_created.push(p.user.clone()),
                Ok(false) => {}
                Err(e) => report
                    .failed
                    .push((p.compute_id.clone(), crate::error::Chain(&e).to_string())),
            }
        }
    }
    for f in desired.state_file.iter().chain(&desired.tmpfiles) {
        if host.write(f, None)? {
            report.written.push(rel(&f.path));
        }
    }
    if desired.state_file.is_none() && host.remove(plan::STATE_PATH)? {
        report.removed.push(plan::STATE_PATH.to_string());
    }
    let keep = desired.tmpfiles_paths();
    for name in names_in(host, plan::TMPFILES_DIR) {
        let p = Path::new(plan::TMPFILES_DIR).join(&name);
        if plan::is_tmpfiles_name(&name) && !keep.contains(&p) && host.remove(&p)? {
            report.removed.push(rel(&p));
        }
    }
    let legacy = remove_legacy_dropins(host)?;
    let (changed, stale) = dropin_drift(host, &desired.dropins);
    if !legacy.is_empty() || !changed.is_empty() || !stale.is_empty() {
        if host.is_live() {
            host.daemon_reload()?;
            // Without the generator the reload loads no limit at all: say so, loudly.
            let missing: Vec<&PathBuf> = desired
                .dropins
                .iter()
                .map(|f| &f.path)
                .filter(|p| !host.path(Path::new(plan::GENERATOR_DIR).join(p)).exists())
                .collect();
            if let Some(first) = missing.first() {
                return Err(ApplyError::NoGenerator {
                    dir: plan::GENERATOR_DIR,
                    missing: missing.len(),
                    wanted: desired.dropins.len(),
                    first: (*first).clone(),
                });
            }
        } else {
            crate::generator::write_output(&host.path(plan::GENERATOR_DIR), &desired.dropins)?;
        }
        report.daemon_reloaded = true;
    }
    let gen_rel = |p: &PathBuf| rel(Path::new(plan::GENERATOR_DIR).join(p));
    report.written.extend(changed.iter().map(gen_rel));
    report.removed.extend(legacy);
    report.removed.extend(stale.iter().map(gen_rel));
    if scope == Scope::Full {
        for p in &desired.plans {
            if report.failed.iter().any(|(id, _)| *id == p.compute_id) {
                continue;
            }
            // Its owner's process answers (or never answers) every access below a FUSE mount:
            // the unit is left alone and reported, the host lock is not held up.
            if let Some(m) = host.fuse_mount_in(p) {
                report.failed.push((
                    p.compute_id.clone(),
                    format!("{m:?} is a FUSE mount: an admin must unmount it"),
                ));
                continue;
            }
            match host.create_dirs(p) {
                Ok(()) => report.dirs_made.push(p.compute_id.clone()),
                Err(e) => report
                    .failed
                    .push((p.compute_id.clone(), crate::error::Chain(&e).to_string())),
            }
        }
    }
    match &desired.nft {
        None => {
            if host.path(plan::NFT_PATH).exists() || host.nft_loaded() == Some(true) {
                host.remove_nft(Path::new(plan::NFT_PATH))?;
                report.written.push(format!("{} (removed)", plan::NFT_PATH));
                report.nft_reloaded = true;
            }
        }
        Some(nft) => {
            let changed = host.write(nft, None)?;
            if changed || host.nft_loaded() == Some(false) {
                host.load_nft(nft)?;
                report.nft_reloaded = true;
            }
            if changed {
                report.written.push(rel(&nft.path));
            }
        }
    }
    Ok(report)
}

/// Names in a root-relative directory (none when it is missing), sorted.
fn names_in(host: &Host, dir: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(host.path(dir))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    v.sort();
    v
}

/// The drop-ins older versions wrote in /etc/systemd/system (first line `# Generated by
/// Kloigos`), removed with the directory they leave empty. An admin's file is left alone.
fn remove_legacy_dropins(host: &Host) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for dir in names_in(host, plan::LEGACY_DROPIN_DIR) {
        if !plan::is_dropin_dir(&dir) {
            continue;
        }
        let d = Path::new(plan::LEGACY_DROPIN_DIR).join(&dir);
        let f = d.join(plan::DROPIN_NAME);
        let ours = host
            .read(&f)
            .is_some_and(|c| c.starts_with(plan::HEADER_PREFIX));
        if ours && host.remove(&f)? {
            host.remove_empty_dir(&d);
            removed.push(rel(&f));
        }
    }
    Ok(removed)
}

/// How the generator's output under the root differs from `want`: files to (re)write and
/// Kloigos drop-ins no unit claims.
fn dropin_drift(host: &Host, want: &[RenderedFile]) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let gen_dir = Path::new(plan::GENERATOR_DIR);
    let changed = want
        .iter()
        .filter(|f| host.read(gen_dir.join(&f.path)).as_deref() != Some(f.content.as_str()))
        .map(|f| f.path.clone())
        .collect();
    let stale = crate::generator::stale_dropins(&host.path(gen_dir), want);
    (changed, stale)
}

impl Host {
    /// No lingering, then no processes, and only then (nobody left to race the removal) the
    /// key and what the owner left outside its directories.
    pub fn end_ownership(&self, plan: &UnitPlan, grace: Duration) -> Result<()> {
        self.set_linger(plan, false)?;
        self.kill_user(plan, grace)?;
        self.remove_authorized_key(plan)?;
        self.remove_user_leftovers(plan)?;
        Ok(())
    }

    /// Takes units off the host entirely: processes, tmpfiles.d file, directories, users.
    /// Keeps going after an error and returns every one. The state file and the generator's
    /// drop-ins follow with the next [`converge`].
    pub fn teardown(
        &self,
        plans: &[UnitPlan],
        grace: Duration,
    ) -> std::result::Result<(), ErrorList> {
        let mut errors = Vec::new();
        for p in plans {
            let r = (|| -> Result<()> {
                self.remove(p.tmpfiles_conf())?;
                self.end_ownership(p, grace)?;
                self.remove_dirs(p)?;
                self.remove_user(&p.user)?;
                Ok(())
            })();
            if let Err(error) = r {
                errors.push(UnitError {
                    compute_id: p.compute_id.clone(),
                    error,
                });
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ErrorList(errors))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::{HostFacts, Renderer};
    use crate::store::{Limits, Server, ServerStatus, Unit, UnitStatus};

    fn rows(n: u32) -> Vec<(Server, Vec<Unit>)> {
        let server = Server {
            hostname: "h1".into(),
            ip: "10.0.0.1".into(),
            region: "r".into(),
            zone: "z".into(),
            status: ServerStatus::Ready,
            cpu_ranges: vec![],
            port_base: 2000,
            ports_per_cpu: 100,
            uid_base: 20000,
            limits: Limits::default(),
            inventory_only: false,
            created_at: "t".into(),
            updated_at: "t".into(),
        };
        let units = (0..n)
            .map(|i| Unit {
                compute_id: format!("h1_{i}"),
                hostname: "h1".into(),
                ip: "10.0.0.1".into(),
                region: "r".into(),
                zone: "z".into(),
                cpu_range: i.to_string().parse().unwrap(),
                cpu_count: 1,
                first_cpu: i,
                uid: 20000 + i,
                user: format!("u{i}"),
                ports_range: format!("{}-{}", 2000 + i * 100, 2099 + i * 100)
                    .parse()
                    .unwrap(),
                status: UnitStatus::Free,
                started_at: None,
                tags: None,
                ssh_public_key: None,
                allocated_by: None,
                updated_at: "t".into(),
                problem: None,
                claim: None,
            })
            .collect();
        vec![(server, units)]
    }

    fn desired(n: u32) -> Desired {
        let facts = HostFacts {
            hostname: "h1".into(),
            socket_bind: false,
        };
        plan::desired(&Renderer::load(&[]).unwrap(), &facts, &[], &rows(n)).unwrap()
    }

    #[test]
    fn converge_writes_then_changes_nothing_then_removes_what_went() {
        let dir = tempfile::tempdir().unwrap();
        let host = Host::new(dir.path());
        // A legacy drop-in of ours and an admin's own in the same place.
        let legacy = dir.path().join("etc/systemd/system/user-20000.slice.d");
        std::fs::create_dir_all(&legacy).unwrap();
        std::fs::write(
            legacy.join("50-kloigos.conf"),
            "# Generated by Kloigos for x\n",
        )
        .unwrap();
        let admin = dir.path().join("etc/systemd/system/user-20001.slice.d");
        std::fs::create_dir_all(&admin).unwrap();
        std::fs::write(admin.join("50-kloigos.conf"), "[Slice]\nAllowedCPUs=0\n").unwrap();

        let r = converge(&host, &desired(2), Scope::Full).unwrap();
        assert!(r.daemon_reloaded && r.failed.is_empty(), "{r:?}");
        assert_eq!(
            r.written,
            [
                "etc/kloigos/host.json",
                "etc/tmpfiles.d/kloigos-c0.conf",
                "etc/tmpfiles.d/kloigos-c1.conf",
                "run/systemd/generator/user-20000.slice.d/50-kloigos.conf",
                "run/systemd/generator/user@20000.service.d/50-kloigos.conf",
                "run/systemd/generator/user-20001.slice.d/50-kloigos.conf",
                "run/systemd/generator/user@20001.service.d/50-kloigos.conf",
                "var/lib/kloigos/kloigos.nft",
            ]
        );
        assert_eq!(
            r.removed,
            ["etc/systemd/system/user-20000.slice.d/50-kloigos.conf"]
        );
        assert!(!legacy.exists(), "the emptied directory goes too");
        assert!(admin.join("50-kloigos.conf").exists(), "not ours: kept");
        assert_eq!(r.dirs_made, ["h1_0", "h1_1"]);
        assert!(dir.path().join("home/u1/.ssh").is_dir());

        let again = converge(&host, &desired(2), Scope::Full).unwrap();
        assert_eq!(
            again,
            ApplyReport {
                dirs_made: vec!["h1_0".into(), "h1_1".into()],
                ..Default::default()
            }
        );

        let fewer = converge(&host, &desired(1), Scope::Files).unwrap();
        assert!(fewer.daemon_reloaded);
        assert_eq!(
            fewer.removed,
            [
                "etc/tmpfiles.d/kloigos-c1.conf",
                "run/systemd/generator/user-20001.slice.d/50-kloigos.conf",
                "run/systemd/generator/user@20001.service.d/50-kloigos.conf",
            ]
        );
        assert!(fewer.dirs_made.is_empty(), "Files scope makes no directory");

        let none = converge(&host, &desired(0), Scope::Files).unwrap();
        assert!(
            none.written
                .contains(&"var/lib/kloigos/kloigos.nft (removed)".to_string())
        );
        assert!(!dir.path().join("var/lib/kloigos/kloigos.nft").exists());
        assert!(
            !dir.path()
                .join("run/systemd/generator/user-20000.slice.d")
                .exists()
        );
        assert!(
            none.removed.contains(&plan::STATE_PATH.to_string()),
            "{none:?}"
        );
        assert!(!dir.path().join(plan::STATE_PATH).exists());
    }

    #[test]
    fn teardown_keeps_going_and_lists_every_error() {
        let dir = tempfile::tempdir().unwrap();
        let host = Host::new(dir.path());
        let d = desired(3);
        converge(&host, &d, Scope::Full).unwrap();
        // Two units' homes belong to someone else: their teardown fails, the third's works.
        for u in ["u0", "u2"] {
            std::os::unix::fs::chown(dir.path().join("home").join(u), Some(4242), None).unwrap();
        }
        let err = host.teardown(&d.plans, Duration::ZERO).unwrap_err();
        let ids: Vec<&str> = err.0.iter().map(|e| e.compute_id.as_str()).collect();
        assert_eq!(ids, ["h1_0", "h1_2"]);
        let shown = err.to_string();
        assert!(shown.starts_with("2 errors:"), "{shown}");
        assert!(shown.contains("h1_0") && shown.contains("h1_2"), "{shown}");
        // Each error is shown with its cause, once (the list has no single source).
        assert!(std::error::Error::source(&err).is_none());
        assert_eq!(shown.matches("h1_0").count(), 1, "{shown}");
        assert!(!dir.path().join("etc/tmpfiles.d/kloigos-c1.conf").exists());
        host.purge_trash();
        assert!(!dir.path().join("home/u1").exists());
    }
}
