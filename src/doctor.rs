//! `kloigos doctor`: does this host give Kloigos what its isolation relies on?
//!
//! The checks read files under a root directory (so they run against fake trees in tests) and,
//! for sshd's effective configuration, the output of `sshd -T` when the caller has it. The only
//! side effect here is [`sshd_effective_config`], which runs `sshd -T` on the live host.
//!
//! The one that matters most: an SSH login of a unit's user must land in `user-UID.slice`, whose
//! `AllowedCPUs=` and limits fence the unit. That takes sshd with `UsePAM yes` and `pam_systemd.so`
//! in sshd's PAM session stack; without it the session runs in `system.slice/ssh.service` with
//! every CPU of the host.

use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::Command;

/// One check: its name, whether it passed, and what was found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Check {
    pub(crate) name: &'static str,
    pub(crate) ok: bool,
    pub(crate) detail: String,
}

impl Check {
    fn new(name: &'static str, result: Result<String, String>) -> Check {
        match result {
            Ok(detail) => Check {
                name,
                ok: true,
                detail,
            },
            Err(detail) => Check {
                name,
                ok: false,
                detail,
            },
        }
    }

    /// The inventory's backend, and for PostgreSQL whether it answers with a schema this
    /// binary can use.
    pub(crate) fn inventory(db: &crate::store::DbTarget) -> Check {
        Check::new("inventory", crate::store::check(db))
    }
}

/// Every check, in a fixed order. `sshd_t` is the output of `sshd -T` if it could be run.
pub(crate) fn checks(root: &Path, sshd_t: Option<&str>) -> Vec<Check> {
    let mut all = ssh_checks(root, sshd_t);
    all.push(Check::new("cgroup-v2-cpuset", cgroup_cpuset(root)));
    all.push(Check::new(
        "nft",
        find_file(root, &["usr/sbin/nft", "sbin/nft", "usr/bin/nft"])
            .map(|p| format!("{} present", p.display()))
            .ok_or_else(|| {
                "nft not found: the port fences need nftables (apt install nftables)".into()
            }),
    ));
    all.push(Check::new(
        "generator",
        find_file(
            root,
            &[
                "usr/lib/systemd/system-generators/kloigos-generator",
                "lib/systemd/system-generators/kloigos-generator",
            ],
        )
        .map(|p| format!("{} present", p.display()))
        .ok_or_else(|| {
            "kloigos-generator is not in /usr/lib/systemd/system-generators: units would get \
             no slice limits (install the kloigos package)"
                .to_string()
        }),
    ));
    all.push(Check::new(
        "logind",
        find_file(
            root,
            &[
                "usr/lib/systemd/systemd-logind",
                "lib/systemd/systemd-logind",
            ],
        )
        .map(|p| format!("{} present", p.display()))
        .ok_or_else(|| {
            "systemd-logind not found: lingering and per-user slices need it".to_string()
        }),
    ));
    all.push(Check::new("fleet", fleet_check(root)));
    all
}

/// Whether the host joined a hub, and if so whether its pull timer is enabled.
fn fleet_check(root: &Path) -> Result<String, String> {
    let join = match crate::fleet::JoinConfig::load(root) {
        Ok(None) => return Ok("not joined to a hub (this host's own inventory)".into()),
        Ok(Some(j)) => j,
        Err(e) => return Err(crate::error::Chain(&e).to_string()),
    };
    let joined = format!("joined to {} as {}", join.hubs.join(", "), join.hostname);
    let timer = ["etc", "usr/lib"]
        .iter()
        .any(|d| root.join(d).join(PULL_TIMER_WANTS).exists());
    if timer {
        Ok(format!("{joined}; kloigos-pull.timer enabled"))
    } else {
        Err(format!(
            "{joined}, but kloigos-pull.timer is not enabled: a missed poke is never caught up \
             (systemctl enable --now kloigos-pull.timer)"
        ))
    }
}

/// The link `systemctl enable kloigos-pull.timer` makes (under etc/ or usr/lib/).
const PULL_TIMER_WANTS: &str = "systemd/system/timers.target.wants/kloigos-pull.timer";

/// The checks that decide whether SSH logins land in the user's slice (what `init_server`
/// refuses on). An sshd that is not installed lets nobody in, so it passes with a note.
pub(crate) fn ssh_checks(root: &Path, sshd_t: Option<&str>) -> Vec<Check> {
    let sshd_installed = find_file(root, &["usr/sbin/sshd", "sbin/sshd"]).is_some()
        || root.join("etc/ssh/sshd_config").is_file();
    if !sshd_installed {
        return vec![Check {
            name: "sshd",
            ok: true,
            detail: "openssh-server is not installed: no SSH logins (units get no SSH access)"
                .into(),
        }];
    }
    let use_pam = match sshd_t {
        Some(out) => usepam_from_sshd_t(out).map(|v| (v, "sshd -T")),
        None => usepam_from_config(root).map(|v| (v, "sshd_config")),
    };
    vec![
        Check::new(
            "sshd-usepam",
            match use_pam {
                Some((true, from)) => Ok(format!("UsePAM yes ({from})")),
                Some((false, from)) => Err(format!(
                    "sshd has UsePAM no ({from}): SSH sessions bypass pam_systemd and run in \
                     ssh.service with every CPU; set `UsePAM yes` in /etc/ssh/sshd_config"
                )),
                None => Err(
                    "cannot tell whether sshd uses PAM (no `sshd -T`, no readable \
                             sshd_config); set `UsePAM yes`"
                        .into(),
                ),
            },
        ),
        Check::new("pam-systemd", pam_systemd(root)),
    ]
}

/// The SSH problems as one sentence each (empty: SSH logins land in the user's slice).
pub(crate) fn ssh_problems(root: &Path, sshd_t: Option<&str>) -> Vec<String> {
    ssh_checks(root, sshd_t)
        .into_iter()
        .filter(|c| !c.ok)
        .map(|c| format!("{}: {}", c.name, c.detail))
        .collect()
}

/// `sshd -T` on the live host (None if sshd is missing or refuses, e.g. without host keys or
/// /run/sshd; the checks then read sshd_config).
pub(crate) fn sshd_effective_config() -> Option<String> {
    ["/usr/sbin/sshd", "/sbin/sshd"]
        .iter()
        .find(|p| Path::new(p).is_file())
        .and_then(|sshd| Command::new(sshd).arg("-T").output().ok())
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
}

fn find_file(root: &Path, candidates: &[&str]) -> Option<PathBuf> {
    candidates
        .iter()
        .map(|c| root.join(c))
        .find(|p| p.is_file())
}

fn cgroup_cpuset(root: &Path) -> Result<String, String> {
    let path = root.join("sys/fs/cgroup/cgroup.controllers");
    let controllers = std::fs::read_to_string(&path).map_err(|_| {
        format!(
            "{} missing: not a cgroup v2 (unified) host; AllowedCPUs= needs it \
             (boot with systemd.unified_cgroup_hierarchy=1)",
            path.display()
        )
    })?;
    if controllers.split_whitespace().any(|c| c == "cpuset") {
        Ok(format!("cgroup v2 controllers: {}", controllers.trim()))
    } else {
        Err(format!(
            "cgroup v2 without the cpuset controller ({}): AllowedCPUs= has no effect",
            controllers.trim()
        ))
    }
}

/// `usepam yes|no` from `sshd -T` output.
pub(crate) fn usepam_from_sshd_t(out: &str) -> Option<bool> {
    out.lines().find_map(|l| {
        let mut w = l.split_whitespace();
        match (w.next(), w.next()) {
            (Some(k), Some(v)) if k.eq_ignore_ascii_case("usepam") => Some(yes(v)),
            _ => None,
        }
    })
}

fn yes(v: &str) -> bool {
    v.eq_ignore_ascii_case("yes")
}

/// UsePAM from `<root>/etc/ssh/sshd_config` and its `Include`s, as sshd reads them: the first
/// value obtained wins; `Match` blocks are skipped (UsePAM is not allowed there). sshd's
/// built-in default is `no`. None if sshd_config cannot be read.
pub(crate) fn usepam_from_config(root: &Path) -> Option<bool> {
    let main = root.join("etc/ssh/sshd_config");
    let text = std::fs::read_to_string(&main).ok()?;
    Some(sshd_keyword(root, &text, "usepam", 0).is_some_and(|v| yes(&v)))
}

fn sshd_keyword(root: &Path, text: &str, key: &str, depth: usize) -> Option<String> {
    if depth > 8 {
        return None;
    }
    let mut in_match = false;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, rest) = match line.split_once(|c: char| c.is_whitespace() || c == '=') {
            Some((k, rest)) => (
                k,
                rest.trim_start_matches(|c: char| c.is_whitespace() || c == '='),
            ),
            None => (line, ""),
        };
        if k.eq_ignore_ascii_case("match") {
            in_match = true;
        } else if k.eq_ignore_ascii_case("include") {
            // Include is honoured inside Match blocks too, but only Match-able keywords count
            // there; UsePAM is not one.
            if in_match {
                continue;
            }
            for pattern in rest.split_whitespace() {
                for file in expand_include(root, pattern) {
                    if let Ok(t) = std::fs::read_to_string(&file)
                        && let Some(v) = sshd_keyword(root, &t, key, depth + 1)
                    {
                        return Some(v);
                    }
                }
            }
        } else if !in_match && k.eq_ignore_ascii_case(key) {
            return rest.split_whitespace().next().map(str::to_string);
        }
    }
    None
}

/// The files an sshd `Include` pattern names, sorted: relative patterns are under /etc/ssh; `*`
/// and `?` are expanded in the last path component.
fn expand_include(root: &Path, pattern: &str) -> Vec<PathBuf> {
    let rel = pattern.trim_matches('"');
    let abs = if rel.starts_with('/') {
        PathBuf::from(rel)
    } else {
        Path::new("/etc/ssh").join(rel)
    };
    let inside = root.join(abs.strip_prefix("/").unwrap_or(&abs));
    let name = inside
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !name.contains(['*', '?']) {
        return vec![inside];
    }
    let Some(dir) = inside.parent() else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| wildcard(&name, &e.file_name().to_string_lossy()))
        .map(|e| e.path())
        .collect();
    files.sort();
    files
}

/// Shell-style `*` and `?` matching (no classes), as sshd's Include globs use them.
fn wildcard(pattern: &str, name: &str) -> bool {
    fn go(p: &[char], n: &[char]) -> bool {
        match p.split_first() {
            None => n.is_empty(),
            Some(('*', rest)) => (0..=n.len()).any(|i| go(rest, &n[i..])),
            Some(('?', rest)) => !n.is_empty() && go(rest, &n[1..]),
            Some((c, rest)) => n.first() == Some(c) && go(rest, &n[1..]),
        }
    }
    // A leading dot is matched only explicitly, as by glob(3).
    if name.starts_with('.') && !pattern.starts_with('.') {
        return false;
    }
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    go(&p, &n)
}

const PAM_DIRS: [&str; 2] = ["etc/pam.d", "usr/lib/pam.d"];
const PAM_MODULE_DIRS: [&str; 6] = [
    "usr/lib/x86_64-linux-gnu/security",
    "lib/x86_64-linux-gnu/security",
    "usr/lib64/security",
    "lib64/security",
    "usr/lib/security",
    "lib/security",
];

/// sshd's PAM session stack reaches `pam_systemd.so` (through `@include`, `include` and
/// `substack`), and the module is installed.
fn pam_systemd(root: &Path) -> Result<String, String> {
    let fix = "install libpam-systemd (Debian) or systemd-pam (Fedora) and enable it \
               (pam-auth-update --enable systemd)";
    let mut chain = Vec::new();
    match pam_session_reaches(root, "sshd", "pam_systemd.so", &mut chain, 0) {
        Reach::NoStack => {
            return Err(format!(
                "no PAM configuration for sshd (/etc/pam.d/sshd): SSH sessions do not land in \
                 the user's slice; {fix}"
            ));
        }
        Reach::No => {
            return Err(format!(
                "pam_systemd.so is not in sshd's PAM session stack: SSH sessions run in \
                 system.slice/ssh.service with every CPU, outside the unit's slice; {fix}"
            ));
        }
        Reach::Yes => {}
    }
    let module = PAM_MODULE_DIRS
        .iter()
        .map(|d| root.join(d).join("pam_systemd.so"))
        .find(|p| p.is_file());
    match module {
        Some(m) => Ok(format!(
            "session stack {} reaches pam_systemd.so ({})",
            chain.join(" -> "),
            m.display()
        )),
        None => Err(format!(
            "sshd's PAM stack names pam_systemd.so but the module is not installed (PAM skips \
             it): SSH sessions run outside the unit's slice; {fix}"
        )),
    }
}

#[derive(Debug, PartialEq)]
enum Reach {
    Yes,
    No,
    NoStack,
}

fn read_pam(root: &Path, service: &str) -> Option<String> {
    if service.contains('/') {
        let p = Path::new(service);
        return std::fs::read_to_string(root.join(p.strip_prefix("/").unwrap_or(p))).ok();
    }
    PAM_DIRS
        .iter()
        .find_map(|d| std::fs::read_to_string(root.join(d).join(service)).ok())
}

/// Whether the session lines of PAM service `service` reach `module`; `chain` collects the files
/// on the way to it.
fn pam_session_reaches(
    root: &Path,
    service: &str,
    module: &str,
    chain: &mut Vec<String>,
    depth: usize,
) -> Reach {
    if depth > 10 {
        return Reach::No;
    }
    let Some(text) = read_pam(root, service) else {
        return Reach::NoStack;
    };
    chain.push(service.to_string());
    for line in pam_lines(&text) {
        let words = pam_words(&line);
        let Some(first) = words.first() else { continue };
        if first == "@include" {
            if let Some(f) = words.get(1)
                && pam_session_reaches(root, f, module, chain, depth + 1) == Reach::Yes
            {
                return Reach::Yes;
            }
            continue;
        }
        if !first
            .trim_start_matches('-')
            .eq_ignore_ascii_case("session")
            || words.len() < 3
        {
            continue;
        }
        let (control, target) = (words[1].as_str(), words[2].as_str());
        if control == "include" || control == "substack" {
            if pam_session_reaches(root, target, module, chain, depth + 1) == Reach::Yes {
                return Reach::Yes;
            }
        } else if Path::new(target).file_name().and_then(|n| n.to_str()) == Some(module) {
            return Reach::Yes;
        }
    }
    chain.pop();
    Reach::No
}

/// Logical lines of a PAM file: comments stripped, `\` continuations joined.
fn pam_lines(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for raw in text.lines() {
        let line = raw.split('#').next().unwrap_or("");
        if let Some(head) = line.strip_suffix('\\') {
            cur.push_str(head);
            cur.push(' ');
            continue;
        }
        cur.push_str(line);
        if !cur.trim().is_empty() {
            out.push(cur.trim().to_string());
        }
        cur.clear();
    }
    if !cur.trim().is_empty() {
        out.push(cur.trim().to_string());
    }
    out
}

/// Words of a PAM line; a `[...]` control (which may hold spaces) is one word.
fn pam_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut rest = line.trim();
    while !rest.is_empty() {
        let end = if rest.starts_with('[') {
            rest.find(']').map_or(rest.len(), |i| i + 1)
        } else {
            rest.find(char::is_whitespace).unwrap_or(rest.len())
        };
        words.push(rest[..end].to_string());
        rest = rest[end..].trim_start();
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn tree(files: &[(&str, &str)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (path, content) in files {
            let p = d.path().join(path);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, content).unwrap();
        }
        d
    }

    const MODULE: (&str, &str) = ("usr/lib/x86_64-linux-gnu/security/pam_systemd.so", "");
    const SSHD: (&str, &str) = ("usr/sbin/sshd", "");

    /// Debian 12 after `apt install openssh-server libpam-systemd`, trimmed.
    fn debian(common_session: &str, sshd_config: &str) -> tempfile::TempDir {
        tree(&[
            SSHD,
            MODULE,
            ("etc/ssh/sshd_config", sshd_config),
            (
                "etc/pam.d/sshd",
                "# PAM configuration for the Secure Shell service\n@include common-auth\n\
                 account    required     pam_nologin.so\n@include common-account\n\
                 session [success=ok ignore=ignore module_unknown=ignore default=bad] pam_selinux.so close\n\
                 session    required     pam_loginuid.so\n@include common-session\n",
            ),
            (
                "etc/pam.d/common-auth",
                "auth [success=1 default=ignore] pam_unix.so nullok\n",
            ),
            ("etc/pam.d/common-account", "account required pam_unix.so\n"),
            ("etc/pam.d/common-session", common_session),
        ])
    }

    const SESSION_WITH: &str = "session\t[default=1]\t\t\tpam_permit.so\nsession\trequisite\t\t\tpam_deny.so\n\
         session\trequired\t\t\tpam_permit.so\nsession\trequired\tpam_unix.so \n\
         session\toptional\tpam_systemd.so \n";
    const SESSION_WITHOUT: &str =
        "session\t[default=1]\t\t\tpam_permit.so\nsession\trequired\tpam_unix.so \n";
    const CONFIG_PAM: &str =
        "Include /etc/ssh/sshd_config.d/*.conf\nKbdInteractiveAuthentication no\nUsePAM yes\n";

    fn failing(checks: &[Check]) -> Vec<&'static str> {
        checks.iter().filter(|c| !c.ok).map(|c| c.name).collect()
    }

    #[test]
    fn debian_with_libpam_systemd_passes() {
        let d = debian(SESSION_WITH, CONFIG_PAM);
        let c = ssh_checks(d.path(), None);
        assert_eq!(failing(&c), Vec::<&str>::new(), "{c:?}");
        assert!(
            c[1].detail.contains("sshd -> common-session"),
            "{}",
            c[1].detail
        );
        assert!(ssh_problems(d.path(), None).is_empty());
    }

    #[test]
    fn minimal_debian_without_libpam_systemd_fails() {
        let d = debian(SESSION_WITHOUT, CONFIG_PAM);
        let problems = ssh_problems(d.path(), None);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0]
                .starts_with("pam-systemd: pam_systemd.so is not in sshd's PAM session stack")
        );
        assert!(problems[0].contains("libpam-systemd"));
    }

    #[test]
    fn module_named_but_not_installed_fails() {
        let d = debian(SESSION_WITH, CONFIG_PAM);
        fs::remove_file(d.path().join(MODULE.0)).unwrap();
        let p = ssh_problems(d.path(), None);
        assert_eq!(p.len(), 1);
        assert!(p[0].contains("module is not installed"), "{p:?}");
    }

    #[test]
    fn pam_systemd_outside_the_session_stack_does_not_count() {
        let d = debian(
            "account optional pam_systemd.so\n# session optional pam_systemd.so\nsession required pam_unix.so\n",
            CONFIG_PAM,
        );
        assert_eq!(failing(&ssh_checks(d.path(), None)), ["pam-systemd"]);
    }

    #[test]
    fn fedora_style_include_and_substack_are_followed() {
        let d = tree(&[
            SSHD,
            ("usr/lib64/security/pam_systemd.so", ""),
            ("etc/ssh/sshd_config", "UsePAM yes\n"),
            (
                "etc/pam.d/sshd",
                "auth substack password-auth\nsession required pam_selinux.so close\n\
                 session include password-auth\n",
            ),
            (
                "etc/pam.d/password-auth",
                "session substack system-session\n",
            ),
            (
                "etc/pam.d/system-session",
                "-session optional pam_systemd.so \\\n  debug\nsession required pam_unix.so\n",
            ),
        ]);
        let c = ssh_checks(d.path(), None);
        assert_eq!(failing(&c), Vec::<&str>::new(), "{c:?}");
        assert!(
            c[1].detail
                .contains("sshd -> password-auth -> system-session"),
            "{}",
            c[1].detail
        );
    }

    #[test]
    fn vendor_pam_dir_and_missing_stack() {
        let d = tree(&[
            SSHD,
            MODULE,
            ("etc/ssh/sshd_config", "UsePAM yes\n"),
            (
                "usr/lib/pam.d/sshd",
                "session optional /usr/lib64/security/pam_systemd.so\n",
            ),
        ]);
        assert!(ssh_problems(d.path(), None).is_empty());
        let d = tree(&[SSHD, MODULE, ("etc/ssh/sshd_config", "UsePAM yes\n")]);
        let p = ssh_problems(d.path(), None);
        assert!(
            p.len() == 1 && p[0].contains("no PAM configuration for sshd"),
            "{p:?}"
        );
    }

    #[test]
    fn include_cycles_end() {
        let d = tree(&[
            SSHD,
            MODULE,
            ("etc/ssh/sshd_config", "UsePAM yes\n"),
            ("etc/pam.d/sshd", "@include a\n"),
            ("etc/pam.d/a", "session include sshd\n"),
        ]);
        assert_eq!(failing(&ssh_checks(d.path(), None)), ["pam-systemd"]);
    }

    #[test]
    fn usepam_first_value_wins_across_includes() {
        // A drop-in read first (Include is on top) overrides the main file's `UsePAM yes`.
        let d = debian(SESSION_WITH, CONFIG_PAM);
        let dropin = d.path().join("etc/ssh/sshd_config.d");
        fs::create_dir_all(&dropin).unwrap();
        fs::write(dropin.join("10-hard.conf"), "usepam=no\n").unwrap();
        fs::write(dropin.join("20-other.conf"), "UsePAM yes\n").unwrap();
        fs::write(dropin.join(".hidden.conf"), "UsePAM yes\n").unwrap();
        let p = ssh_problems(d.path(), None);
        assert!(
            p.len() == 1 && p[0].starts_with("sshd-usepam: sshd has UsePAM no (sshd_config)"),
            "{p:?}"
        );
        fs::remove_file(dropin.join("10-hard.conf")).unwrap();
        assert!(ssh_problems(d.path(), None).is_empty());
    }

    #[test]
    fn usepam_default_and_match_blocks() {
        // sshd's built-in default is no; a value inside a Match block does not count.
        for config in [
            "Port 22\n",
            "Match User x\n  UsePAM yes\n",
            "# UsePAM yes\n",
        ] {
            let d = debian(SESSION_WITH, config);
            assert_eq!(
                failing(&ssh_checks(d.path(), None)),
                ["sshd-usepam"],
                "{config:?}"
            );
        }
        let d = debian(
            SESSION_WITH,
            "Include missing.conf\nUsePAM\tYes\nMatch all\nUsePAM no\n",
        );
        assert!(ssh_problems(d.path(), None).is_empty());
    }

    #[test]
    fn sshd_t_output_takes_precedence_over_files() {
        let d = debian(SESSION_WITH, CONFIG_PAM);
        let p = ssh_problems(d.path(), Some("port 22\nusepam no\nx11forwarding yes\n"));
        assert!(
            p.len() == 1 && p[0].contains("UsePAM no (sshd -T)"),
            "{p:?}"
        );
        assert!(ssh_problems(d.path(), Some("usepam yes\n")).is_empty());
        assert_eq!(usepam_from_sshd_t("port 22\n"), None);
    }

    #[test]
    fn no_sshd_means_no_logins() {
        let d = tree(&[MODULE]);
        let c = ssh_checks(d.path(), None);
        assert!(
            c.len() == 1 && c[0].ok && c[0].detail.contains("not installed"),
            "{c:?}"
        );
    }

    #[test]
    fn host_checks() {
        let good = tree(&[
            SSHD,
            MODULE,
            ("etc/ssh/sshd_config", "UsePAM yes\n"),
            ("etc/pam.d/sshd", "session optional pam_systemd.so\n"),
            (
                "sys/fs/cgroup/cgroup.controllers",
                "cpuset cpu io memory pids\n",
            ),
            ("usr/sbin/nft", ""),
            ("usr/lib/systemd/system-generators/kloigos-generator", ""),
            ("lib/systemd/systemd-logind", ""),
        ]);
        let c = checks(good.path(), None);
        assert_eq!(failing(&c), Vec::<&str>::new(), "{c:?}");
        assert_eq!(
            c.iter().map(|c| c.name).collect::<Vec<_>>(),
            [
                "sshd-usepam",
                "pam-systemd",
                "cgroup-v2-cpuset",
                "nft",
                "generator",
                "logind",
                "fleet"
            ]
        );
        let bad = tree(&[
            SSHD,
            ("sys/fs/cgroup/cgroup.controllers", "cpu io memory pids\n"),
        ]);
        let c = checks(bad.path(), None);
        assert_eq!(
            failing(&c),
            [
                "sshd-usepam",
                "pam-systemd",
                "cgroup-v2-cpuset",
                "nft",
                "generator",
                "logind"
            ]
        );
        assert!(c[2].detail.contains("without the cpuset controller"));
        let v1 = tree(&[]);
        assert!(
            checks(v1.path(), None)[1]
                .detail
                .contains("not a cgroup v2")
        );
    }

    #[test]
    fn fleet_check_says_joined_and_timer() {
        let alone = tree(&[]);
        let c = fleet_check(alone.path());
        assert!(c.as_ref().is_ok_and(|d| d.contains("not joined")), "{c:?}");
        let join = r#"{"hubs": ["http://hub1:8000"], "hostname": "h1", "poke_url": null}"#;
        let joined = tree(&[("etc/kloigos/join.json", join)]);
        let c = fleet_check(joined.path());
        assert!(
            c.as_ref()
                .is_err_and(|d| d.contains("http://hub1:8000") && d.contains("not enabled")),
            "{c:?}"
        );
        let timer = tree(&[
            ("etc/kloigos/join.json", join),
            (
                "etc/systemd/system/timers.target.wants/kloigos-pull.timer",
                "",
            ),
        ]);
        let c = fleet_check(timer.path());
        assert!(c.as_ref().is_ok_and(|d| d.contains("enabled")), "{c:?}");
        let broken = tree(&[("etc/kloigos/join.json", "{")]);
        assert!(fleet_check(broken.path()).is_err());
    }

    #[test]
    fn wildcards() {
        assert!(wildcard("*.conf", "a.conf"));
        assert!(wildcard("a?c", "abc"));
        assert!(!wildcard("*.conf", "a.conf.bak"));
        assert!(!wildcard("*.conf", ".a.conf"));
        assert!(wildcard("*", "x"));
    }

    #[test]
    fn pam_words_keep_bracket_controls() {
        assert_eq!(
            pam_words("session [success=ok default=bad] pam_selinux.so close"),
            [
                "session",
                "[success=ok default=bad]",
                "pam_selinux.so",
                "close"
            ]
        );
    }
}
