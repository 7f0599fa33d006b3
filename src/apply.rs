//! The one seam that changes a host. Every path is joined onto `root`; against `/` (a *live*
//! host) it also runs the system's own tools (`useradd`, `systemctl`, `systemd-tmpfiles`, `nft`,
//! `loginctl`) and kills processes. Against any other root it writes the same files and runs
//! nothing that needs a live system, so the whole service runs in tests and on a laptop.
//!
//! Every file write is atomic: a temporary file in the same directory, fsync, rename.

use crate::render::{RenderedFile, UnitPlan};
use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        cmd: String,
        status: String,
        stderr: String,
    },
    #[error("{0}")]
    Conflict(String),
    #[error("processes of uid {uid} still running after {secs} s: {pids:?}")]
    Unkillable { uid: u32, secs: u64, pids: Vec<i32> },
}

pub type Result<T> = std::result::Result<T, ApplyError>;

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ApplyError + '_ {
    move |source| ApplyError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A host to change: the real one (`/`) or a directory standing in for it.
#[derive(Debug, Clone)]
pub struct Host {
    root: PathBuf,
    live: bool,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Host {
    pub fn new(root: impl Into<PathBuf>) -> Host {
        let root = root.into();
        let live = root
            .canonicalize()
            .map(|r| r == Path::new("/"))
            .unwrap_or(false);
        Host { root, live }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// True when this is the running system and its tools are used.
    pub fn is_live(&self) -> bool {
        self.live
    }

    /// `rel` joined onto the root (`rel` may be absolute: its leading `/` is dropped).
    pub fn path(&self, rel: impl AsRef<Path>) -> PathBuf {
        let rel = rel.as_ref();
        self.root.join(rel.strip_prefix("/").unwrap_or(rel))
    }

    pub fn read(&self, rel: impl AsRef<Path>) -> Option<String> {
        fs::read_to_string(self.path(rel)).ok()
    }

    /// Writes `content` atomically unless the file already holds exactly that with that mode.
    /// Returns whether anything changed.
    pub fn write(&self, f: &RenderedFile, owner: Option<(u32, u32)>) -> Result<bool> {
        let path = self.path(&f.path);
        if let Ok(meta) = fs::symlink_metadata(&path) {
            let same_owner = owner.is_none_or(|(u, g)| meta.uid() == u && meta.gid() == g);
            if meta.is_file()
                && meta.permissions().mode() & 0o7777 == f.mode
                && same_owner
                && fs::read(&path).is_ok_and(|c| c == f.content.as_bytes())
            {
                return Ok(false);
            }
        }
        let dir = path.parent().unwrap_or(Path::new("/"));
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let name = path.file_name().unwrap_or(OsStr::new("file"));
        let tmp = dir.join(format!(
            ".{}.kloigos-{}-{}",
            name.to_string_lossy(),
            std::process::id(),
            TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let result = (|| {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(f.mode)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp)?;
            file.write_all(f.content.as_bytes())?;
            file.set_permissions(fs::Permissions::from_mode(f.mode))?;
            if let Some((u, g)) = owner {
                std::os::unix::fs::fchown(&file, Some(u), Some(g))?;
            }
            file.sync_all()?;
            fs::rename(&tmp, &path)?;
            // Make the rename itself durable.
            fs::File::open(dir)?.sync_all()
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map_err(io_err(&path))?;
        Ok(true)
    }

    /// Removes a file; returns whether it existed.
    pub fn remove(&self, rel: impl AsRef<Path>) -> Result<bool> {
        let path = self.path(rel);
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            // A parent that is not a directory cannot hold the file either.
            Err(e)
                if e.kind() == io::ErrorKind::NotFound
                    || e.raw_os_error() == Some(libc::ENOTDIR) =>
            {
                Ok(false)
            }
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// Removes a drop-in directory if Kloigos' file was the last thing in it.
    pub fn remove_empty_dir(&self, rel: impl AsRef<Path>) {
        let _ = fs::remove_dir(self.path(rel));
    }

    fn run(&self, program: &str, args: &[&str]) -> Result<String> {
        let cmd = format!("{program} {}", args.join(" "));
        tracing::debug!(command = %cmd, "running");
        let out = Command::new(program)
            .args(args)
            .env("SYSTEMD_PAGER", "")
            .output()
            .map_err(|e| ApplyError::Command {
                cmd: cmd.clone(),
                status: "not started".into(),
                stderr: e.to_string(),
            })?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(ApplyError::Command {
                cmd,
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            })
        }
    }

    /// Does this host's systemd enforce `SocketBindAllow=`? (Needs `+BPF_FRAMEWORK`.)
    pub fn socket_bind_supported(&self) -> bool {
        self.live
            && self
                .run("systemctl", &["--version"])
                .is_ok_and(|v| v.contains("+BPF_FRAMEWORK"))
    }

    /// Creates the unit's user and group with the planned UID/GID, or checks that an existing
    /// one matches. Returns whether it was created.
    pub fn ensure_user(&self, plan: &UnitPlan) -> Result<bool> {
        if !self.live {
            return Ok(false);
        }
        let by_name = nix::unistd::User::from_name(&plan.user).ok().flatten();
        let by_uid = nix::unistd::User::from_uid(plan.uid.into()).ok().flatten();
        match (by_name, by_uid) {
            (Some(u), _) if u.uid.as_raw() == plan.uid => return Ok(false),
            (Some(u), _) => {
                return Err(ApplyError::Conflict(format!(
                    "user {} exists with uid {}, Kloigos needs uid {}",
                    plan.user, u.uid, plan.uid
                )));
            }
            (None, Some(other)) => {
                return Err(ApplyError::Conflict(format!(
                    "uid {} is taken by user {}, needed for {}",
                    plan.uid, other.name, plan.user
                )));
            }
            (None, None) => {}
        }
        let uid = plan.uid.to_string();
        if nix::unistd::Group::from_name(&plan.user)
            .ok()
            .flatten()
            .is_none()
        {
            self.run("groupadd", &["--gid", &uid, &plan.user])?;
        }
        let comment = format!("Kloigos compute unit {}", plan.compute_id);
        // Password `*`: no password login, yet not "locked", so key logins work with or
        // without PAM.
        self.run(
            "useradd",
            &[
                "--uid",
                &uid,
                "--gid",
                &plan.user,
                "--home-dir",
                &plan.dirs.home,
                "--no-create-home",
                "--shell",
                "/bin/bash",
                "--password",
                "*",
                "--comment",
                &comment,
                &plan.user,
            ],
        )?;
        Ok(true)
    }

    /// Deletes the unit's user and group (files were removed before).
    pub fn remove_user(&self, user: &str) -> Result<()> {
        if !self.live {
            return Ok(());
        }
        if nix::unistd::User::from_name(user).ok().flatten().is_some() {
            self.run("userdel", &[user])?;
        }
        if nix::unistd::Group::from_name(user).ok().flatten().is_some() {
            self.run("groupdel", &[user])?;
        }
        Ok(())
    }

    pub fn daemon_reload(&self) -> Result<()> {
        if self.live {
            self.run("systemctl", &["daemon-reload"])?;
        }
        Ok(())
    }

    /// Creates the unit's directories from its tmpfiles.d file (the file must be written), and
    /// fills an empty home from /etc/skel.
    pub fn create_dirs(&self, plan: &UnitPlan) -> Result<()> {
        if self.live {
            let conf = self.path(plan.tmpfiles_conf());
            self.run("systemd-tmpfiles", &["--create", &conf.to_string_lossy()])?;
        } else {
            self.tmpfiles_emulate(&plan.tmpfiles_conf())?;
        }
        self.fill_skeleton(plan)
    }

    /// What `systemd-tmpfiles --create` does with the `d`, `D` and `f` lines of a file, for a
    /// root that is not a live system (ownership is left alone: the users do not exist there).
    fn tmpfiles_emulate(&self, conf: &Path) -> Result<()> {
        let conf_path = self.path(conf);
        let text = fs::read_to_string(&conf_path).map_err(io_err(&conf_path))?;
        for line in text.lines().map(str::trim) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(kind), Some(path)) = (fields.first(), fields.get(1)) else {
                continue;
            };
            let mode = fields.get(2).and_then(|m| u32::from_str_radix(m, 8).ok());
            let p = self.path(path);
            match *kind {
                "d" | "D" => {
                    fs::create_dir_all(&p).map_err(io_err(&p))?;
                    if let Some(m) = mode {
                        fs::set_permissions(&p, fs::Permissions::from_mode(m))
                            .map_err(io_err(&p))?;
                    }
                }
                "f" if !p.exists() => {
                    if let Some(dir) = p.parent() {
                        fs::create_dir_all(dir).map_err(io_err(dir))?;
                    }
                    fs::write(&p, "").map_err(io_err(&p))?;
                    if let Some(m) = mode {
                        fs::set_permissions(&p, fs::Permissions::from_mode(m))
                            .map_err(io_err(&p))?;
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Copies /etc/skel into the unit's home when the home holds nothing but `.ssh`.
    fn fill_skeleton(&self, plan: &UnitPlan) -> Result<()> {
        let home = self.path(&plan.dirs.home);
        let empty = fs::read_dir(&home)
            .map_err(io_err(&home))?
            .filter_map(|e| e.ok())
            .all(|e| e.file_name() == ".ssh");
        let skel = self.path("etc/skel");
        if !empty || !skel.is_dir() {
            return Ok(());
        }
        let owner = self.live.then_some((plan.uid, plan.uid));
        copy_tree(&skel, &home, owner)
    }

    /// Lingering on or off: the user's `systemd --user` runs without a login session.
    pub fn set_linger(&self, plan: &UnitPlan, on: bool) -> Result<()> {
        if self.live {
            let verb = if on {
                "enable-linger"
            } else {
                "disable-linger"
            };
            self.run("loginctl", &[verb, &plan.user])?;
        } else if on {
            self.write(
                &RenderedFile {
                    path: plan.linger_file(),
                    content: String::new(),
                    mode: 0o644,
                },
                None,
            )?;
        } else {
            self.remove(plan.linger_file())?;
        }
        Ok(())
    }

    /// Refuses to work through a path component the unit's user could have swapped for a symlink.
    fn check_no_symlink(&self, rel: &str) -> Result<()> {
        let p = self.path(rel);
        match fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => Err(ApplyError::Conflict(format!(
                "{} is a symlink; refusing to follow it",
                p.display()
            ))),
            _ => Ok(()),
        }
    }

    pub fn write_authorized_key(&self, plan: &UnitPlan, key_line: &str) -> Result<()> {
        self.check_no_symlink(&format!("{}/.ssh", plan.dirs.home))?;
        let owner = self.live.then_some((plan.uid, plan.uid));
        self.write(
            &RenderedFile {
                path: plan.authorized_keys(),
                content: format!("{key_line}\n"),
                mode: 0o600,
            },
            owner,
        )?;
        Ok(())
    }

    pub fn remove_authorized_key(&self, plan: &UnitPlan) -> Result<()> {
        let ssh = self.path(format!("{}/.ssh", plan.dirs.home));
        if fs::symlink_metadata(&ssh).is_ok_and(|m| m.file_type().is_symlink()) {
            // A user's symlink: removing the link itself is safe, following it is not.
            fs::remove_file(&ssh).map_err(io_err(&ssh))?;
            return Ok(());
        }
        self.remove(plan.authorized_keys())?;
        Ok(())
    }

    pub fn authorized_key(&self, plan: &UnitPlan) -> Option<String> {
        self.read(plan.authorized_keys())
            .map(|s| s.trim_end().to_string())
    }

    /// Ends every process of the unit's user: sessions and the user manager through logind,
    /// then SIGTERM, a short grace, and SIGKILL (also through the slice's `cgroup.kill`) until
    /// none is left.
    pub fn kill_user(&self, plan: &UnitPlan, grace: Duration) -> Result<()> {
        if !self.live {
            return Ok(());
        }
        let _ = self.run("loginctl", &["terminate-user", &plan.user]);
        let deadline = Instant::now() + grace;
        signal_uid(plan.uid, nix::sys::signal::Signal::SIGTERM);
        while Instant::now() < deadline && !pids_of_uid(plan.uid).is_empty() {
            std::thread::sleep(Duration::from_millis(100));
        }
        let kill_deadline = Instant::now() + Duration::from_secs(15);
        let cgroup_kill = format!(
            "/sys/fs/cgroup/user.slice/user-{}.slice/cgroup.kill",
            plan.uid
        );
        loop {
            let _ = fs::write(&cgroup_kill, "1");
            signal_uid(plan.uid, nix::sys::signal::Signal::SIGKILL);
            std::thread::sleep(Duration::from_millis(50));
            let left = pids_of_uid(plan.uid);
            if left.is_empty() {
                break;
            }
            if Instant::now() > kill_deadline {
                return Err(ApplyError::Unkillable {
                    uid: plan.uid,
                    secs: 15,
                    pids: left,
                });
            }
        }
        let unit = format!("user@{}.service", plan.uid);
        let _ = self.run("systemctl", &["stop", &unit]);
        let _ = self.run("systemctl", &["reset-failed", &unit]);
        Ok(())
    }

    /// Removes what the user may have left outside its directories: crontab, at jobs, mail,
    /// and files it owns in /tmp, /var/tmp and /dev/shm.
    pub fn remove_user_leftovers(&self, plan: &UnitPlan) -> Result<()> {
        for f in [
            format!("var/spool/cron/crontabs/{}", plan.user),
            format!("var/spool/cron/{}", plan.user),
            format!("var/mail/{}", plan.user),
        ] {
            if self.path(&f).is_file() {
                self.remove(&f)?;
            }
        }
        for spool in ["var/spool/cron/atjobs", "var/spool/at"] {
            remove_owned(&self.path(spool), plan.uid, false)?;
        }
        for tmp in ["tmp", "var/tmp", "dev/shm"] {
            remove_owned(&self.path(tmp), plan.uid, true)?;
        }
        Ok(())
    }

    /// Empties the unit's directories (never following the user's symlinks) and recreates the
    /// clean skeleton.
    pub fn wipe_dirs(&self, plan: &UnitPlan) -> Result<()> {
        for d in [&plan.dirs.opt, &plan.dirs.mnt, &plan.dirs.home] {
            empty_dir(&self.path(d))?;
        }
        self.create_dirs(plan)
    }

    /// Removes the unit's directories entirely (decommission). /mnt/c… may be a mount point:
    /// then only its content goes.
    pub fn remove_dirs(&self, plan: &UnitPlan) -> Result<()> {
        for d in [&plan.dirs.opt, &plan.dirs.mnt, &plan.dirs.home] {
            let p = self.path(d);
            empty_dir(&p)?;
            match fs::remove_dir(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                // A mount point (EBUSY) stays, empty.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => return Err(io_err(&p)(e)),
            }
        }
        Ok(())
    }

    /// Loads the rendered table with `nft -f` (one atomic transaction).
    pub fn load_nft(&self, f: &RenderedFile) -> Result<()> {
        if self.live {
            self.run("nft", &["-f", &self.path(&f.path).to_string_lossy()])?;
        }
        Ok(())
    }

    /// Removes the `inet kloigos` table from the kernel and its file.
    pub fn remove_nft(&self, f: &Path) -> Result<()> {
        if self.live {
            let present = self
                .run("nft", &["list", "table", "inet", "kloigos"])
                .is_ok();
            if present {
                self.run("nft", &["delete", "table", "inet", "kloigos"])?;
            }
        }
        self.remove(f)?;
        Ok(())
    }

    /// Does the kernel hold the table, and does it match the file? (Live hosts only.)
    pub fn nft_loaded(&self) -> Option<bool> {
        self.live.then(|| {
            self.run("nft", &["list", "table", "inet", "kloigos"])
                .is_ok()
        })
    }
}

/// Every pid whose real, effective or saved uid is `uid`.
pub fn pids_of_uid(uid: u32) -> Vec<i32> {
    let mut pids = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return pids;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(status) = fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        let owned = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .is_some_and(|ids| {
                ids.split_whitespace()
                    .take(3)
                    .any(|id| id.parse::<u32>() == Ok(uid))
            });
        if owned {
            pids.push(pid);
        }
    }
    pids
}

fn signal_uid(uid: u32, sig: nix::sys::signal::Signal) {
    for pid in pids_of_uid(uid) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
    }
}

/// Removes everything inside `dir` (not `dir` itself). std's remove_dir_all never follows
/// symlinks, so a user's link to /etc removes the link, not /etc.
fn empty_dir(dir: &Path) -> Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(dir)(e)),
    };
    for e in entries {
        let e = e.map_err(io_err(dir))?;
        let p = e.path();
        let ft = e.file_type().map_err(io_err(&p))?;
        if ft.is_dir() {
            fs::remove_dir_all(&p).map_err(io_err(&p))?;
        } else {
            fs::remove_file(&p).map_err(io_err(&p))?;
        }
    }
    Ok(())
}

/// Removes entries of `dir` owned by `uid`; with `recurse`, also inside directories it does not
/// own (a user's file in a shared directory), never following symlinks or crossing devices.
fn remove_owned(dir: &Path, uid: u32, recurse: bool) -> Result<()> {
    let Ok(dev) = fs::symlink_metadata(dir).map(|m| m.dev()) else {
        return Ok(());
    };
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(());
    };
    for e in entries.flatten() {
        let p = e.path();
        let Ok(m) = fs::symlink_metadata(&p) else {
            continue;
        };
        if m.uid() == uid {
            let r = if m.is_dir() {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            };
            r.map_err(io_err(&p))?;
        } else if recurse && m.is_dir() && m.dev() == dev {
            remove_owned(&p, uid, true)?;
        }
    }
    Ok(())
}

fn copy_tree(from: &Path, to: &Path, owner: Option<(u32, u32)>) -> Result<()> {
    for e in fs::read_dir(from).map_err(io_err(from))?.flatten() {
        let src = e.path();
        let dst = to.join(e.file_name());
        let m = fs::symlink_metadata(&src).map_err(io_err(&src))?;
        if m.is_dir() {
            fs::create_dir_all(&dst).map_err(io_err(&dst))?;
            fs::set_permissions(&dst, m.permissions()).map_err(io_err(&dst))?;
            copy_tree(&src, &dst, owner)?;
        } else if m.is_file() {
            fs::copy(&src, &dst).map_err(io_err(&dst))?;
        } else {
            continue;
        }
        if let Some((u, g)) = owner {
            std::os::unix::fs::lchown(&dst, Some(u), Some(g)).map_err(io_err(&dst))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, content: &str, mode: u32) -> RenderedFile {
        RenderedFile {
            path: path.into(),
            content: content.into(),
            mode,
        }
    }

    #[test]
    fn atomic_write_reports_changes_and_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let host = Host::new(dir.path());
        assert!(!host.is_live());
        let f = file("/etc/x/y.conf", "a\n", 0o644);
        assert!(host.write(&f, None).unwrap());
        assert!(!host.write(&f, None).unwrap());
        assert!(
            host.write(&file("etc/x/y.conf", "a\n", 0o600), None)
                .unwrap()
        );
        let meta = fs::metadata(dir.path().join("etc/x/y.conf")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert!(
            host.write(&file("etc/x/y.conf", "b\n", 0o600), None)
                .unwrap()
        );
        assert_eq!(host.read("etc/x/y.conf").unwrap(), "b\n");
        let names: Vec<_> = fs::read_dir(dir.path().join("etc/x"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("y.conf")]);
        assert!(host.remove("etc/x/y.conf").unwrap());
        assert!(!host.remove("etc/x/y.conf").unwrap());
    }

    #[test]
    fn empty_dir_does_not_follow_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        fs::create_dir_all(&outside).unwrap();
        fs::write(outside.join("precious"), "x").unwrap();
        let home = dir.path().join("home/u0");
        fs::create_dir_all(home.join("sub/deeper")).unwrap();
        fs::write(home.join("sub/deeper/f"), "x").unwrap();
        std::os::unix::fs::symlink(&outside, home.join("link")).unwrap();
        std::os::unix::fs::symlink(&outside, home.join("sub/link")).unwrap();
        empty_dir(&home).unwrap();
        assert_eq!(fs::read_dir(&home).unwrap().count(), 0);
        assert!(outside.join("precious").exists());
    }

    #[test]
    fn remove_owned_only_takes_that_uid() {
        let dir = tempfile::tempdir().unwrap();
        let me = nix::unistd::getuid().as_raw();
        fs::create_dir_all(dir.path().join("a/b")).unwrap();
        fs::write(dir.path().join("a/b/mine"), "x").unwrap();
        remove_owned(dir.path(), me + 1, true).unwrap();
        assert!(dir.path().join("a/b/mine").exists());
        remove_owned(&dir.path().join("a"), me, true).unwrap();
        assert!(!dir.path().join("a/b").exists());
    }
}
