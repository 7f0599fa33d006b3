//! `kloigos-generator`, a systemd.generator(7): reads this host's state file
//! (`etc/kloigos/host.json` under `$KLOIGOS_GENERATOR_ROOT`, default `/`) and writes each
//! unit's `user-UID.slice.d/50-kloigos.conf` and `user@UID.service.d/50-kloigos.conf` into the
//! normal output directory systemd gives it, and nothing else.
//!
//! The rules of a generator: fast, no network, no IPC, no write outside the output directory,
//! never fail the boot. A unit that cannot be rendered is skipped with a message (on
//! `/dev/kmsg` when systemd runs it, else on stderr); the exit status is 0 whatever the input.
//!
//! The service runs [`write_output`] in-process with a fake root ("daemon-reload" of the
//! tests, as zram-generator's fake mode), into `ROOT/run/systemd/generator`.

use crate::apply::{ApplyError, Host};
use crate::plan::{self, STATE_VERSION};
use crate::render::{HostFacts, RenderedFile, Renderer, UnitPlan};
use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The environment variable naming the root the generator reads (tests); default `/`.
pub(crate) const ROOT_ENV: &str = "KLOIGOS_GENERATOR_ROOT";

/// Where messages go: `/dev/kmsg` (as `<3>kloigos-generator: ...`) when run by systemd,
/// stderr otherwise.
pub(crate) enum Log {
    Kmsg(std::fs::File),
    Stderr,
}

impl Log {
    /// systemd (v251 and later) sets `$SYSTEMD_SCOPE` for generators; at boot their stderr
    /// may go nowhere, so messages go to the kernel log, which the journal picks up.
    pub(crate) fn detect() -> Log {
        if std::env::var_os("SYSTEMD_SCOPE").is_some()
            && let Ok(f) = std::fs::OpenOptions::new().write(true).open("/dev/kmsg")
        {
            return Log::Kmsg(f);
        }
        Log::Stderr
    }

    /// One message, error level (`<3>`). Losing a log line never stops the generator.
    pub(crate) fn error(&mut self, msg: &str) {
        // One line per message: a value from the state file must not forge a second one.
        let msg = msg.replace(['\n', '\r'], " ");
        match self {
            Log::Kmsg(f) => {
                let _ = f.write_all(format!("<3>kloigos-generator: {msg}\n").as_bytes());
            }
            Log::Stderr => eprintln!("kloigos-generator: {msg}"),
        }
    }
}

/// A state file read: the host facts and each unit, or why it is skipped.
#[derive(Debug)]
pub(crate) struct ParsedState {
    pub host: HostFacts,
    pub units: Vec<Result<UnitPlan, String>>,
}

/// Parses the state file. A wrong version or shape of the whole file is an error (nothing is
/// generated); a bad unit is only that unit's error.
pub(crate) fn parse_state(text: &str) -> Result<ParsedState, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    match v.get("version").and_then(serde_json::Value::as_u64) {
        Some(n) if n == u64::from(STATE_VERSION) => {}
        other => {
            return Err(format!(
                "unsupported version {other:?} (this generator reads version {STATE_VERSION})"
            ));
        }
    }
    let host: HostFacts = v
        .get("host")
        .cloned()
        .ok_or_else(|| "no \"host\" object".to_string())
        .and_then(|h| serde_json::from_value(h).map_err(|e| format!("\"host\": {e}")))?;
    let units = v
        .get("units")
        .and_then(serde_json::Value::as_array)
        .ok_or_else(|| "no \"units\" list".to_string())?
        .iter()
        .enumerate()
        .map(|(i, u)| {
            let id = u
                .get("compute_id")
                .and_then(serde_json::Value::as_str)
                .map(|s| format!("{s:?}"))
                .unwrap_or_else(|| format!("#{i}"));
            serde_json::from_value::<UnitPlan>(u.clone())
                .map_err(|e| format!("unit {id}: {e}"))
                .and_then(|p| p.check().map(|()| p).map_err(|e| format!("unit {id}: {e}")))
        })
        .collect();
    Ok(ParsedState { host, units })
}

/// Renders every unit's drop-ins; a unit that fails (or reuses a uid) is skipped and its
/// message returned.
pub(crate) fn render(renderer: &Renderer, state: ParsedState) -> (Vec<RenderedFile>, Vec<String>) {
    let mut files = Vec::new();
    let mut skipped = Vec::new();
    let mut uids = std::collections::BTreeSet::new();
    for unit in state.units {
        let plan = match unit {
            Ok(p) => p,
            Err(e) => {
                skipped.push(format!("{e}; skipped"));
                continue;
            }
        };
        if !uids.insert(plan.uid) {
            skipped.push(format!(
                "unit {:?}: uid {} already used by another unit; skipped",
                plan.compute_id, plan.uid
            ));
            continue;
        }
        match renderer.dropins(&state.host, &plan) {
            Ok(f) => files.extend(f),
            Err(e) => skipped.push(format!("unit {:?}: {e}; skipped", plan.compute_id)),
        }
    }
    (files, skipped)
}

/// What a run changed in its output directory (relative paths).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Output {
    pub written: Vec<PathBuf>,
    pub removed: Vec<PathBuf>,
}

/// Brings `out_dir` to exactly `files` as far as Kloigos' drop-ins go: writes what differs
/// (atomically), removes `*/50-kloigos.conf` of a drop-in directory that is not in `files`,
/// and the directory if that left it empty. Nothing outside `out_dir` is touched.
pub(crate) fn write_output(out_dir: &Path, files: &[RenderedFile]) -> Result<Output, ApplyError> {
    let host = Host::new(out_dir);
    let mut out = Output::default();
    for rel in stale_dropins(out_dir, files) {
        if host.remove(&rel)? {
            if let Some(d) = rel.parent() {
                host.remove_empty_dir(d);
            }
            out.removed.push(rel);
        }
    }
    for f in files {
        if host.write(f, None)? {
            out.written.push(f.path.clone());
        }
    }
    Ok(out)
}

/// Kloigos drop-ins in `out_dir` (`*/50-kloigos.conf` of a unit's drop-in directory) that none
/// of `files` claims, relative to `out_dir`, sorted.
pub(crate) fn stale_dropins(out_dir: &Path, files: &[RenderedFile]) -> Vec<PathBuf> {
    let keep: std::collections::BTreeSet<&Path> = files.iter().map(|f| f.path.as_path()).collect();
    let mut stale: Vec<PathBuf> = std::fs::read_dir(out_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| plan::is_dropin_dir(n))
        .map(|d| Path::new(&d).join(plan::DROPIN_NAME))
        .filter(|rel| !keep.contains(rel.as_path()) && out_dir.join(rel).exists())
        .collect();
    stale.sort();
    stale
}

/// The template layers under `root`: `usr/lib/kloigos/templates`, then `etc/kloigos/templates`.
pub(crate) fn template_dirs(root: &Path) -> Vec<PathBuf> {
    plan::TEMPLATE_DIRS.iter().map(|d| root.join(d)).collect()
}

/// One generator run: `root`'s state file into `normal_dir`. Every problem is logged; none
/// stops the others.
pub(crate) fn run(root: &Path, normal_dir: &Path, log: &mut Log) -> Output {
    let state_path = root.join(plan::STATE_PATH);
    let text = match std::fs::read(&state_path) {
        Ok(b) => match String::from_utf8(b) {
            Ok(t) => t,
            Err(_) => {
                log.error(&format!("{state_path:?}: not UTF-8; nothing generated"));
                return Output::default();
            }
        },
        // No state file: Kloigos was never initialised here (or was purged).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Output::default(),
        Err(e) => {
            log.error(&format!("{state_path:?}: {e}; nothing generated"));
            return Output::default();
        }
    };
    let state = match parse_state(&text) {
        Ok(s) => s,
        Err(e) => {
            log.error(&format!("{state_path:?}: {e}; nothing generated"));
            return Output::default();
        }
    };
    let renderer = match Renderer::load(&template_dirs(root)) {
        Ok(r) => r,
        Err(e) => {
            // The fence matters more than the admin's customisation: use the built-ins.
            log.error(&format!("{e}; using the built-in templates"));
            match Renderer::load(&[]) {
                Ok(r) => r,
                Err(e) => {
                    log.error(&format!("built-in templates: {e}; nothing generated"));
                    return Output::default();
                }
            }
        }
    };
    let (files, skipped) = render(&renderer, state);
    for s in &skipped {
        log.error(s);
    }
    match write_output(normal_dir, &files) {
        Ok(o) => o,
        Err(e) => {
            log.error(&e.to_string());
            // Then each file on its own: one that cannot be written does not stop the others.
            let mut out = Output::default();
            for f in files {
                match Host::new(normal_dir).write(&f, None) {
                    Ok(true) => out.written.push(f.path),
                    Ok(false) => {}
                    Err(e) => log.error(&e.to_string()),
                }
            }
            out
        }
    }
}

/// `kloigos-generator NORMAL_DIR [EARLY_DIR LATE_DIR]`; returns the exit status (0 but for a
/// usage error: a generator never fails the boot).
pub fn main_with_args(args: impl IntoIterator<Item = OsString>) -> i32 {
    let args: Vec<OsString> = args.into_iter().skip(1).collect();
    let mut log = Log::detect();
    let Some(normal) = args.first().filter(|_| (1..=3).contains(&args.len())) else {
        log.error("usage: kloigos-generator NORMAL_DIR [EARLY_DIR LATE_DIR]");
        return 2;
    };
    let root = std::env::var_os(ROOT_ENV).unwrap_or_else(|| OsString::from("/"));
    let root = if root.is_empty() {
        PathBuf::from("/")
    } else {
        PathBuf::from(root)
    };
    run(&root, Path::new(normal), &mut log);
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(units: &str) -> String {
        format!(
            r#"{{"version": 1, "host": {{"hostname": "h1", "socket_bind": false}}, "units": [{units}]}}"#
        )
    }

    fn unit_json(id: &str, uid: u32, user: &str) -> String {
        format!(
            r#"{{"compute_id": "{id}", "hostname": "h1", "user": "{user}", "uid": {uid},
              "cpu_range": "0-3", "cpus": "0-3", "cpu_count": 4, "memory_nodes": null,
              "ports": [{{"first": 2000, "last": 2399}}], "ports_range": "2000-2399",
              "dirs": {{"opt": "/opt/c0-3", "mnt": "/mnt/c0-3", "home": "/home/{user}"}},
              "allocated": false, "limits": {{"memory_max": null, "memory_high": null,
              "tasks_max": null, "io_weight": null, "io_read_bandwidth_max": [],
              "io_write_bandwidth_max": []}}}}"#
        )
    }

    #[test]
    fn a_bad_unit_is_skipped_the_others_rendered() {
        let good = unit_json("h1_0-3", 20000, "u0-3");
        let evil = unit_json("h1_4-7", 20004, "u4\\nExecStart=/bin/sh");
        let dup = unit_json("h1_dup", 20000, "u9");
        let text = state(&format!(r#"{good}, {evil}, {{"compute_id": "x"}}, {dup}"#));
        let parsed = parse_state(&text).unwrap();
        let (files, skipped) = render(&Renderer::load(&[]).unwrap(), parsed);
        let paths: Vec<_> = files.iter().map(|f| f.path.clone()).collect();
        assert_eq!(
            paths,
            [plan::slice_dropin(20000), plan::user_service_dropin(20000)]
        );
        assert_eq!(skipped.len(), 3, "{skipped:?}");
        assert!(skipped[0].contains("h1_4-7"), "{skipped:?}");
        assert!(skipped[1].contains("\"x\""), "{skipped:?}");
        assert!(skipped[2].contains("uid 20000"), "{skipped:?}");
    }

    #[test]
    fn the_whole_file_must_be_a_known_version() {
        assert!(parse_state("nope").unwrap_err().contains("not JSON"));
        assert!(
            parse_state(r#"{"version": 2, "host": {}, "units": []}"#)
                .unwrap_err()
                .contains("unsupported version")
        );
        assert!(parse_state(r#"{"version": 1, "units": []}"#).is_err());
        assert!(
            parse_state(r#"{"version": 1, "host": {"hostname": "h", "socket_bind": true}}"#)
                .is_err()
        );
        let p = parse_state(&state("")).unwrap();
        assert!(p.units.is_empty());
    }

    #[test]
    fn output_is_exactly_the_desired_dropins() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        let f = |uid: u32, c: &str| RenderedFile {
            path: plan::slice_dropin(uid),
            content: c.into(),
            mode: 0o644,
        };
        std::fs::create_dir_all(out.join("user-5.slice.d")).unwrap();
        std::fs::write(out.join("user-5.slice.d/50-kloigos.conf"), "old").unwrap();
        std::fs::create_dir_all(out.join("user-6.slice.d")).unwrap();
        std::fs::write(out.join("user-6.slice.d/50-kloigos.conf"), "old").unwrap();
        std::fs::write(out.join("user-6.slice.d/10-other.conf"), "x").unwrap();
        std::fs::create_dir_all(out.join("other.service.d")).unwrap();
        std::fs::write(out.join("other.service.d/50-kloigos.conf"), "x").unwrap();
        let o = write_output(out, &[f(1, "a\n"), f(5, "old")]).unwrap();
        assert_eq!(o.written, [plan::slice_dropin(1)]);
        assert_eq!(o.removed, [plan::slice_dropin(6)]);
        assert!(out.join("user-6.slice.d/10-other.conf").exists());
        assert!(out.join("other.service.d/50-kloigos.conf").exists());
        let again = write_output(out, &[f(1, "a\n"), f(5, "old")]).unwrap();
        assert_eq!(again, Output::default());
        write_output(out, &[]).unwrap();
        assert!(
            !out.join("user-5.slice.d").exists(),
            "empty directory removed"
        );
    }
}
