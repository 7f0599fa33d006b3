//! The one seam that changes a host. Every path is joined onto `root`; against `/` (a *live*
//! host) it also runs the system's own tools (`useradd`, `systemctl`, `nft`, `loginctl`) and
//! kills processes. Against any other root it writes the same files, through the same code, and
//! runs nothing that needs a live system, so the whole service runs in tests and on a laptop.
//!
//! Every file write is atomic: a temporary file in the same directory, fsync, rename.
//!
//! # Security rule: no root operation by path where a tenant can write
//!
//! Kloigos runs as root next to hostile tenants. A tenant can swap any entry of a directory it
//! can write (its home, /opt/c…, /mnt/c…, /tmp, /var/tmp, /dev/shm, spools) for a symlink at any
//! instant, so a path through such a directory means nothing between two system calls. Hence:
//!
//! - Paths are resolved only up to a directory no tenant can write (`/home`, `/opt`, `/mnt`,
//!   `/tmp` itself, `/etc/skel`, `/etc/...`): [`dirfd::DirFd::open_trusted`].
//! - From there everything goes through directory handles, one component at a time, opened
//!   with `O_NOFOLLOW` (`openat`, `mkdirat`, `unlinkat`, `renameat`, `fchown`/`fchmod` on the
//!   descriptor). A symlink where a directory is expected is removed (the link, never its
//!   target) or the operation fails; new files are created `O_EXCL`, so nothing is ever
//!   written through an existing entry; files are read `O_NOFOLLOW|O_NONBLOCK` and only if
//!   regular.
//! - Directories of a unit are checked before they are chowned: owned by root or by the unit.
//!   On a fake root (not `/`) the unit's uid is not a real user: ownership is left to root
//!   (who runs the tests), i.e. the expected owner is `None` = root.
//! - Processes of a unit are killed before its files are removed; /etc/skel is copied only
//!   into a unit nobody owns (at init and at release, after the kill).
//!
//! A unit whose files cannot be repaired this way fails alone: `reconcile` reports it and
//! serves the others.

mod converge;
pub mod dbus;
mod dirfd;

pub use converge::{ApplyReport, ErrorList, Scope, converge};

use crate::render::{RenderedFile, UnitPlan};
pub use dirfd::DirFd;
use dirfd::Owner;
use std::ffi::OsStr;
use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    // `{:?}`: a path may hold a tenant's file name, with newlines or terminal escapes.
    #[error("{path:?}")]
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
    #[error(
        "systemd reloaded but {missing} of {wanted} unit drop-ins are not in /{dir} (first: {first:?}): \
         is kloigos-generator installed in /usr/lib/systemd/system-generators?"
    )]
    NoGenerator {
        dir: &'static str,
        missing: usize,
        wanted: usize,
        first: PathBuf,
    },
}

pub type Result<T> = std::result::Result<T, ApplyError>;

/// Name prefix of a released unit's directory moved aside (see [`Host::wipe_dirs`]).
pub const TRASH_PREFIX: &str = ".kloigos-trash-";

/// A host to change: the real one (`/`) or a directory standing in for it.
#[derive(Debug, Clone)]
pub struct Host {
    root: PathBuf,
    live: bool,
    /// Directories moved aside by [`Host::wipe_dirs`] and [`Host::remove_dirs`], as (parent,
    /// name), for [`Host::purge_trash`] to remove once the host lock is released.
    trash: Arc<Mutex<Vec<(PathBuf, OsString)>>>,
}

impl Host {
    pub fn new(root: impl Into<PathBuf>) -> Host {
        let root = root.into();
        let live = root
            .canonicalize()
            .map(|r| r == Path::new("/"))
            .unwrap_or(false);
        Host {
            root,
            live,
            trash: Arc::default(),
        }
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

    /// Reads a regular file (never through a symlink at its last component).
    pub fn read(&self, rel: impl AsRef<Path>) -> Option<String> {
        let (dir, name) = self.split(rel.as_ref())?;
        let dir = DirFd::open_trusted(&dir).ok()?;
        let bytes = dir.read_file(&name).ok()??;
        String::from_utf8(bytes).ok()
    }

    /// `rel` as (its directory on this host, its last component).
    fn split(&self, rel: &Path) -> Option<(PathBuf, std::ffi::OsString)> {
        let path = self.path(rel);
        let name = path.file_name()?.to_os_string();
        Some((path.parent()?.to_path_buf(), name))
    }

    fn split_or_err(&self, rel: &Path) -> Result<(PathBuf, std::ffi::OsString)> {
        self.split(rel).ok_or_else(|| ApplyError::Io {
            path: self.path(rel),
            source: io::Error::from(io::ErrorKind::InvalidInput),
        })
    }

    /// Writes a system file atomically unless it already holds exactly that with that mode and
    /// owner. Returns whether anything changed. `read`, `write` and `remove` resolve the
    /// directory by path: only for directories no tenant can write (/etc, /var/lib); a unit's
    /// tree goes through the unit methods below.
    pub fn write(&self, f: &RenderedFile, owner: Option<(u32, u32)>) -> Result<bool> {
        let (dir, name) = self.split_or_err(&f.path)?;
        let dir = DirFd::create_trusted(&dir)?;
        if let Some(st) = dir.lstat(&name)? {
            let same_owner = owner.is_none_or(|(u, g)| st.st_uid == u && st.st_gid == g);
            if st.st_mode & libc::S_IFMT == libc::S_IFREG
                && st.st_mode & 0o7777 == f.mode
                && same_owner
                && dir
                    .read_file(&name)?
                    .is_some_and(|c| c == f.content.as_bytes())
            {
                return Ok(false);
            }
        }
        dir.write_file(&name, f.content.as_bytes(), f.mode, owner)?;
        Ok(true)
    }

    /// Removes a file (or a link: never what it points to); returns whether it existed.
    pub fn remove(&self, rel: impl AsRef<Path>) -> Result<bool> {
        let (dir, name) = self.split_or_err(rel.as_ref())?;
        // A parent that is missing or not a directory cannot hold the file either.
        let Some(dir) = open_opt(&dir)? else {
            return Ok(false);
        };
        dir.remove_entry(&name)
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

    /// Calls logind's `member` on the system bus (what loginctl does, without starting it);
    /// where the bus cannot be reached, runs `fallback` (loginctl) instead.
    fn logind(
        &self,
        member: &str,
        args: &[dbus::Arg],
        fallback: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        match dbus::call_system(&dbus::logind(member, args)) {
            Ok(()) => Ok(()),
            Err(e @ dbus::DbusError::Transport(_)) => {
                tracing::warn!(error = %e, member, "logind over D-Bus failed; running loginctl");
                fallback()
            }
            Err(e) => Err(ApplyError::Command {
                cmd: format!("logind {member} (D-Bus)"),
                status: "error reply".into(),
                stderr: e.to_string(),
            }),
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

    /// Owner of what Kloigos creates for the unit: the unit's user on a live host; on a fake
    /// root the uid is no real user, so files stay root's (`None`).
    fn owner(&self, plan: &UnitPlan) -> Owner {
        self.live.then_some((plan.uid, plan.uid))
    }

    /// A directory only root can write, or `None` when it is missing.
    fn trusted_opt(&self, rel: impl AsRef<Path>) -> Result<Option<DirFd>> {
        open_opt(&self.path(rel))
    }

    /// Opens one of the unit's own directories (/opt/c…, /mnt/c…, /home/u…) from a handle on
    /// its parent, which no tenant may write, never following a link. With `create`
    /// (mode, owner), makes it if needed and claims it; without, `None` when it is missing or
    /// not a directory. Either way it must belong to root or the unit.
    fn unit_dir(&self, plan: &UnitPlan, dir: &str, create: Option<u32>) -> Result<Option<DirFd>> {
        let (parent, name) = self.split_or_err(Path::new(dir))?;
        let parent = match create {
            Some(_) => DirFd::create_trusted(&parent)?,
            None => match open_opt(&parent)? {
                Some(p) => p,
                None => return Ok(None),
            },
        };
        let st = parent.stat()?;
        if st.st_uid != 0 || st.st_mode & 0o022 != 0 {
            return Err(ApplyError::Conflict(format!(
                "{:?} must belong to root and be writable by root only",
                parent.path()
            )));
        }
        let owner = self.owner(plan);
        match create {
            Some(mode) => Ok(Some(parent.ensure_dir(&name, mode, owner)?)),
            None => {
                let d = parent.open_dir_opt(&name)?;
                if let Some(d) = &d {
                    d.check_owner(owner)?;
                }
                Ok(d)
            }
        }
    }

    /// Creates the unit's directories as its tmpfiles.d file says (the `d`/`D` lines for the
    /// unit's own directories and below; the file must be written), through handles, then fills
    /// a home nobody owns from /etc/skel. systemd-tmpfiles applies the same file at boot.
    pub fn create_dirs(&self, plan: &UnitPlan) -> Result<()> {
        let conf = plan.tmpfiles_conf();
        let text = self.read(&conf).ok_or_else(|| ApplyError::Io {
            path: self.path(&conf),
            source: io::Error::from(io::ErrorKind::NotFound),
        })?;
        let tops = [&plan.dirs.opt, &plan.dirs.mnt, &plan.dirs.home];
        for line in text.lines().map(str::trim) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(&("d" | "D")), Some(path)) = (fields.first(), fields.get(1)) else {
                continue;
            };
            let mode = fields
                .get(2)
                .and_then(|m| u32::from_str_radix(m, 8).ok())
                .unwrap_or(0o750);
            // Only the unit's own directories and what is below them; anything else is the
            // admin's, created at boot.
            let Some((top, rest)) = tops.iter().find_map(|t| {
                let rest = path.strip_prefix(t.as_str())?;
                (rest.is_empty() || rest.starts_with('/')).then_some((t, rest))
            }) else {
                continue;
            };
            let comps: Vec<&str> = rest.split('/').filter(|c| !c.is_empty()).collect();
            let Some((last, between)) = comps.split_last() else {
                self.unit_dir(plan, top, Some(mode))?;
                continue;
            };
            // The directories on the way keep their own line's mode; missing ones are made.
            let mut dir = match self.unit_dir(plan, top, None)? {
                Some(d) => d,
                None => self
                    .unit_dir(plan, top, Some(0o750))?
                    .ok_or_else(|| ApplyError::Conflict(format!("cannot create {top}")))?,
            };
            for c in between {
                dir = match dir.open_dir_opt(OsStr::new(c))? {
                    Some(d) => d,
                    None => dir.ensure_dir(OsStr::new(c), 0o750, self.owner(plan))?,
                };
            }
            dir.ensure_dir(OsStr::new(last), mode, self.owner(plan))?;
        }
        self.fill_skeleton(plan)
    }

    /// Copies /etc/skel into the unit's home when it holds nothing but `.ssh`, and only when
    /// nobody owns the unit (at init, and at release after its processes are gone): an
    /// owner's home is theirs.
    pub fn fill_skeleton(&self, plan: &UnitPlan) -> Result<()> {
        if plan.allocated {
            return Ok(());
        }
        let Some(home) = self.unit_dir(plan, &plan.dirs.home, None)? else {
            return Ok(());
        };
        let mut only_ssh = true;
        home.for_each_entry(|n| {
            only_ssh = n == ".ssh";
            Ok(only_ssh)
        })?;
        if !only_ssh {
            return Ok(());
        }
        let Some(skel) = self.trusted_opt("etc/skel")? else {
            return Ok(());
        };
        home.copy_tree_from(&skel, self.owner(plan))
    }

    /// Lingering on or off: the user's `systemd --user` runs without a login session.
    pub fn set_linger(&self, plan: &UnitPlan, on: bool) -> Result<()> {
        if self.live {
            let args = [
                dbus::Arg::U32(plan.uid),
                dbus::Arg::Bool(on),
                dbus::Arg::Bool(false),
            ];
            self.logind("SetUserLinger", &args, || {
                let verb = if on {
                    "enable-linger"
                } else {
                    "disable-linger"
                };
                self.run("loginctl", &[verb, &plan.user]).map(drop)
            })?;
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

    /// A FUSE mount in the unit's directories, if there is one (from this host's
    /// `/proc/self/mountinfo`). Its owner's process answers every access to it, and may never
    /// answer: such a tree is not touched while the owner can run (only after the kill, when
    /// the mount answers at once with an error).
    pub fn fuse_mount_in(&self, plan: &UnitPlan) -> Option<String> {
        let text = fs::read_to_string(self.path("proc/self/mountinfo")).ok()?;
        let dirs = [
            plan.dirs.opt.as_str(),
            plan.dirs.mnt.as_str(),
            plan.dirs.home.as_str(),
        ];
        fuse_mounts_under(&text, &dirs).into_iter().next()
    }

    /// Installs the owner's key: `.ssh` is made a directory of the unit's (a link or file
    /// there is removed, not followed), the key written atomically inside it.
    pub fn write_authorized_key(&self, plan: &UnitPlan, key_line: &str) -> Result<()> {
        let home = self.unit_dir(plan, &plan.dirs.home, None)?.ok_or_else(|| {
            ApplyError::Conflict(format!(
                "{:?} is missing or not a directory",
                self.path(&plan.dirs.home)
            ))
        })?;
        let owner = self.owner(plan);
        let ssh = home.ensure_dir(OsStr::new(".ssh"), 0o700, owner)?;
        ssh.write_file(
            OsStr::new("authorized_keys"),
            format!("{key_line}\n").as_bytes(),
            0o600,
            owner,
        )
    }

    /// Removes the key (whatever the owner made of it); a `.ssh` that is a link or a file is
    /// removed itself.
    pub fn remove_authorized_key(&self, plan: &UnitPlan) -> Result<()> {
        let Some(home) = self.unit_dir(plan, &plan.dirs.home, None)? else {
            return Ok(());
        };
        let ssh = OsStr::new(".ssh");
        match home.open_dir(ssh) {
            Ok(d) => {
                d.remove_entry(OsStr::new("authorized_keys"))?;
            }
            Err(nix::errno::Errno::ENOENT) => {}
            Err(nix::errno::Errno::ELOOP | nix::errno::Errno::ENOTDIR) => {
                home.remove_entry(ssh)?;
            }
            Err(e) => {
                return Err(ApplyError::Io {
                    path: home.path().join(ssh),
                    source: e.into(),
                });
            }
        }
        Ok(())
    }

    /// The installed key, if `.ssh/authorized_keys` is a regular file in a real directory.
    pub fn authorized_key(&self, plan: &UnitPlan) -> Option<String> {
        let home = self.unit_dir(plan, &plan.dirs.home, None).ok()??;
        let ssh = home.open_dir_opt(OsStr::new(".ssh")).ok()??;
        let bytes = ssh.read_file(OsStr::new("authorized_keys")).ok()??;
        String::from_utf8(bytes)
            .ok()
            .map(|s| s.trim_end().to_string())
    }

    /// Ends every process of the unit's user: sessions and the user manager through logind,
    /// then SIGTERM, a short grace, and SIGKILL (also through the slice's `cgroup.kill`) until
    /// none is left.
    pub fn kill_user(&self, plan: &UnitPlan, grace: Duration) -> Result<()> {
        if !self.live {
            return Ok(());
        }
        let _ = self.logind("TerminateUser", &[dbus::Arg::U32(plan.uid)], || {
            self.run("loginctl", &["terminate-user", &plan.user])
                .map(drop)
        });
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
            // Nothing left (often: the second pass of a release): no wait.
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
            std::thread::sleep(Duration::from_millis(20));
        }
        let unit = format!("user@{}.service", plan.uid);
        let _ = self.run("systemctl", &["stop", &unit]);
        let _ = self.run("systemctl", &["reset-failed", &unit]);
        Ok(())
    }

    /// Removes what the user may have left outside its directories: crontab, at jobs, mail,
    /// POSIX message queues, and files it owns in /tmp, /var/tmp and /dev/shm (through handles: these directories
    /// are shared with the tenant).
    pub fn remove_user_leftovers(&self, plan: &UnitPlan) -> Result<()> {
        for spool in ["var/spool/cron/crontabs", "var/spool/cron", "var/mail"] {
            let name = OsStr::new(&plan.user);
            if let Some(d) = self.trusted_opt(spool)?
                && d.lstat(name)?
                    .is_some_and(|st| st.st_mode & libc::S_IFMT != libc::S_IFDIR)
            {
                d.remove_entry(name)?;
            }
        }
        for spool in ["var/spool/cron/atjobs", "var/spool/at"] {
            if let Some(d) = self.trusted_opt(spool)? {
                d.remove_owned(plan.uid, false)?;
            }
        }
        // What the user owns right in these shared directories is moved into a new directory
        // only root can enter, removed after the host lock is released (see `purge_trash`).
        for tmp in ["tmp", "var/tmp", "dev/shm"] {
            let Some(d) = self.trusted_opt(tmp)? else {
                continue;
            };
            match d.new_private_dir(TRASH_PREFIX) {
                Ok((name, aside)) => {
                    let r = d.move_owned_aside(plan.uid, &aside);
                    self.trash
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((self.path(tmp), name));
                    r?;
                }
                Err(e) => {
                    tracing::warn!(error = %crate::error::Chain(&e), "removing leftovers in place");
                    d.remove_owned(plan.uid, true)?;
                }
            }
        }
        // POSIX message queues outlive their processes (and logind's RemoveIPC= may be off).
        if let Some(d) = self.trusted_opt("dev/mqueue")? {
            d.remove_owned(plan.uid, false)?;
        }
        Ok(())
    }

    /// Empties the unit's directories (never following the user's symlinks) and recreates the
    /// clean skeleton. Each directory is moved aside first, closed to everyone (see
    /// [`DirFd::move_aside`]), so this takes the same short time whatever the tenant left
    /// there: the removal itself is [`Host::purge_trash`]'s, after the host lock is released.
    /// A mount point is emptied in place.
    pub fn wipe_dirs(&self, plan: &UnitPlan) -> Result<()> {
        for d in [&plan.dirs.opt, &plan.dirs.mnt, &plan.dirs.home] {
            self.clear_unit_dir(plan, d)?;
        }
        self.create_dirs(plan)
    }

    /// Moves the unit directory `d` aside for [`Host::purge_trash`], or empties it in place
    /// when it cannot move (a mount point).
    fn clear_unit_dir(&self, plan: &UnitPlan, d: &str) -> Result<()> {
        let Some(dir) = self.unit_dir(plan, d, None)? else {
            return Ok(());
        };
        let (parent_path, name) = self.split_or_err(Path::new(d))?;
        // `unit_dir` checked that only root can write the parent.
        let parent = DirFd::open_trusted(&parent_path)?;
        match parent.move_aside(&name, &dir, TRASH_PREFIX)? {
            Some(aside) => self
                .trash
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((parent_path, aside)),
            None => dir.empty()?,
        }
        Ok(())
    }

    /// Removes the unit's directories entirely (decommission). /mnt/c… may be a mount point:
    /// then only its content goes.
    pub fn remove_dirs(&self, plan: &UnitPlan) -> Result<()> {
        for d in [&plan.dirs.opt, &plan.dirs.mnt, &plan.dirs.home] {
            self.clear_unit_dir(plan, d)?;
            let (parent, name) = self.split_or_err(Path::new(d))?;
            if let Some(parent) = open_opt(&parent)? {
                parent.remove_empty_dir(&name)?;
            }
        }
        Ok(())
    }

    /// Adds to the trash what a previous run moved aside and did not remove (it was stopped
    /// or failed): root's private `.kloigos-trash-…` directories in the parents of the units'
    /// directories and in /tmp, /var/tmp and /dev/shm.
    pub fn find_trash<'a>(&self, plans: impl IntoIterator<Item = &'a UnitPlan>) -> Result<()> {
        let mut parents: Vec<PathBuf> = ["tmp", "var/tmp", "dev/shm"].map(|t| self.path(t)).into();
        for plan in plans {
            for d in [&plan.dirs.opt, &plan.dirs.mnt, &plan.dirs.home] {
                let parent = self.split_or_err(Path::new(d))?.0;
                if !parents.contains(&parent) {
                    parents.push(parent);
                }
            }
        }
        // This process's own are registered when made and removed by whoever made them.
        let mine = format!("-{}-", std::process::id());
        let mut trash = self.trash.lock().unwrap_or_else(|p| p.into_inner());
        for parent_path in parents {
            let Some(parent) = open_opt(&parent_path)? else {
                continue;
            };
            parent.for_each_entry(|name| {
                let known = trash.iter().any(|(p, n)| *p == parent_path && n == name);
                // Only root's own private directories: anyone may make a name in /tmp.
                let ours = || {
                    parent.lstat(name).ok().flatten().is_some_and(|st| {
                        st.st_uid == 0
                            && st.st_mode & libc::S_IFMT == libc::S_IFDIR
                            && st.st_mode & 0o077 == 0
                    })
                };
                let bytes = name.as_encoded_bytes();
                let own = bytes.windows(mine.len()).any(|w| w == mine.as_bytes());
                if bytes.starts_with(TRASH_PREFIX.as_bytes()) && !known && !own && ours() {
                    trash.push((parent_path.clone(), name.to_os_string()));
                }
                Ok(true)
            })?;
        }
        Ok(())
    }

    /// Removes the directories moved aside so far (each by one caller only); a failure is
    /// logged and the directory stays for the next reconcile. Returns how many were removed.
    pub fn purge_trash(&self) -> usize {
        let taken = std::mem::take(&mut *self.trash.lock().unwrap_or_else(|p| p.into_inner()));
        let mut removed = 0;
        for (parent, name) in taken {
            let r = open_opt(&parent).and_then(|p| match p {
                Some(p) => p.remove_entry(&name),
                None => Ok(false),
            });
            match r {
                Ok(true) => removed += 1,
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(error = %crate::error::Chain(&e), "cannot remove a released unit's old files")
                }
            }
        }
        removed
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

/// A directory only root can write, by its path on the host; `None` when it is missing.
fn open_opt(path: &Path) -> Result<Option<DirFd>> {
    match DirFd::open_trusted(path) {
        Ok(d) => Ok(Some(d)),
        Err(ApplyError::Io { source, .. })
            if matches!(
                source.raw_os_error(),
                Some(libc::ENOENT) | Some(libc::ENOTDIR)
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Mount points of FUSE filesystems (any user may make one with `fusermount` on a directory
/// it owns) at or below one of `dirs`, from the text of a `mountinfo` file. Paths are
/// unescaped (`\040` is a space).
pub fn fuse_mounts_under(mountinfo: &str, dirs: &[&str]) -> Vec<String> {
    fn unescape(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            let oct = b
                .get(i + 1..i + 4)
                .filter(|o| o.iter().all(|c| (b'0'..=b'7').contains(c)));
            match (b[i], oct) {
                (b'\\', Some(o)) => {
                    out.push(o.iter().fold(0u8, |n, c| n.wrapping_mul(8) + (c - b'0')));
                    i += 4;
                }
                (c, _) => {
                    out.push(c);
                    i += 1;
                }
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    mountinfo
        .lines()
        .filter_map(|line| {
            let (mount, fs) = line.split_once(" - ")?;
            let point = unescape(mount.split(' ').nth(4)?);
            let fstype = fs.split(' ').next()?;
            let fuse = fstype == "fuse" || fstype == "fuseblk" || fstype.starts_with("fuse.");
            let under = dirs.iter().any(|d| {
                point
                    .strip_prefix(d.trim_end_matches('/'))
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            });
            (fuse && under).then_some(point)
        })
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The names in a directory, sorted.
    fn names(p: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
    use std::os::unix::fs::PermissionsExt;

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

    fn plan(allocated: bool) -> UnitPlan {
        UnitPlan {
            compute_id: "h_0".into(),
            hostname: "h".into(),
            user: "u0".into(),
            uid: 20000,
            cpu_range: "0".into(),
            cpus: "0".into(),
            cpu_count: 1,
            memory_nodes: None,
            ports: vec![],
            ports_range: "2000-2099".into(),
            dirs: crate::render::Dirs {
                opt: "/opt/c0".into(),
                mnt: "/mnt/c0".into(),
                home: "/home/u0".into(),
            },
            allocated,
            limits: Default::default(),
        }
    }

    #[test]
    fn unit_files_never_go_through_a_tenant_link() {
        let dir = tempfile::tempdir().unwrap();
        let host = Host::new(dir.path().join("root"));
        let conf = "d /opt/c0 0750 u0 u0 -\nd /mnt/c0 0750 u0 u0 -\n\
                    d /home/u0 0750 u0 u0 -\nd /home/u0/.ssh 0700 u0 u0 -\n";
        host.write(
            &file(&plan(false).tmpfiles_conf().to_string_lossy(), conf, 0o644),
            None,
        )
        .unwrap();
        host.write(&file("etc/skel/.bashrc", "skel\n", 0o644), None)
            .unwrap();
        let outside = dir.path().join("outside");
        fs::create_dir_all(&outside).unwrap();
        fs::write(outside.join("authorized_keys"), "ssh-ed25519 AAAA key\n").unwrap();
        let home = host.path("home/u0");
        let mode = |p: &Path| fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777;

        // A unit nobody owns gets the skeleton.
        host.create_dirs(&plan(false)).unwrap();
        assert_eq!(host.read("home/u0/.bashrc").as_deref(), Some("skel\n"));
        assert_eq!(mode(&home.join(".ssh")), 0o700);
        assert_eq!(mode(&host.path("opt/c0")), 0o750);

        // Its owner swaps .ssh for a link: the key goes into a real .ssh, not through it.
        fs::remove_dir(home.join(".ssh")).unwrap();
        std::os::unix::fs::symlink(&outside, home.join(".ssh")).unwrap();
        assert_eq!(
            host.authorized_key(&plan(true)),
            None,
            "not read through a link"
        );
        host.write_authorized_key(&plan(true), "ssh-ed25519 BBBB own")
            .unwrap();
        assert!(fs::symlink_metadata(home.join(".ssh")).unwrap().is_dir());
        assert_eq!(
            host.authorized_key(&plan(true)).as_deref(),
            Some("ssh-ed25519 BBBB own")
        );

        // An owned unit's home is not refilled from the skeleton.
        fs::remove_file(home.join(".bashrc")).unwrap();
        host.create_dirs(&plan(true)).unwrap();
        assert!(!home.join(".bashrc").exists());

        // Removing the key through a link removes the link only.
        fs::remove_dir_all(home.join(".ssh")).unwrap();
        std::os::unix::fs::symlink(&outside, home.join(".ssh")).unwrap();
        host.remove_authorized_key(&plan(true)).unwrap();
        assert!(!home.join(".ssh").exists());
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 1);

        // Wiping recreates the skeleton, whatever the owner left.
        fs::create_dir_all(home.join("a/b")).unwrap();
        std::os::unix::fs::symlink(&outside, home.join("a/link")).unwrap();
        host.wipe_dirs(&plan(false)).unwrap();
        let mut left: Vec<_> = fs::read_dir(&home)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        left.sort();
        assert_eq!(left, [".bashrc", ".ssh"]);
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 1);
    }

    /// A release costs the same whatever the tenant left: its directories are moved aside,
    /// closed to everyone (a later holder of the same uid included), and removed by
    /// `purge_trash`, which the service runs after the host lock is released.
    #[test]
    fn wipe_moves_the_old_tree_aside_closed_and_purge_removes_it() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let host = Host::new(dir.path().join("root"));
        let conf = "d /opt/c0 0750 u0 u0 -\nd /mnt/c0 0750 u0 u0 -\nd /home/u0 0750 u0 u0 -\n";
        host.write(
            &file(&plan(false).tmpfiles_conf().to_string_lossy(), conf, 0o644),
            None,
        )
        .unwrap();
        host.write(&file("etc/skel/.bashrc", "skel\n", 0o644), None)
            .unwrap();
        host.create_dirs(&plan(false)).unwrap();
        let home = host.path("home/u0");
        for i in 0..50 {
            fs::create_dir_all(home.join(format!("d{i}/e"))).unwrap();
            fs::write(home.join(format!("d{i}/e/f")), "x").unwrap();
        }
        fs::write(host.path("opt/c0/data"), "x").unwrap();

        host.wipe_dirs(&plan(false)).unwrap();
        assert_eq!(names(&home), [".bashrc"]);
        assert_eq!(names(&host.path("opt/c0")), Vec::<String>::new());
        let aside: Vec<String> = names(&host.path("home"))
            .into_iter()
            .filter(|n| n.starts_with(TRASH_PREFIX))
            .collect();
        assert_eq!(aside.len(), 1, "{aside:?}");
        let m = fs::symlink_metadata(host.path("home").join(&aside[0])).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (0, 0, 0o700));
        assert_eq!(names(&host.path("home").join(&aside[0])).len(), 51);

        assert_eq!(host.purge_trash(), 3, "opt, mnt and home");
        assert_eq!(names(&host.path("home")), ["u0"]);
        assert_eq!(names(&host.path("opt")), ["c0"]);
        assert_eq!(host.purge_trash(), 0);

        // What a stopped run left aside is found again and removed.
        fs::create_dir_all(host.path("home/.kloigos-trash-u0-1-2/deep")).unwrap();
        fs::set_permissions(
            host.path("home/.kloigos-trash-u0-1-2"),
            fs::Permissions::from_mode(0o700),
        )
        .unwrap();
        host.find_trash([&plan(false)]).unwrap();
        host.find_trash([&plan(false), &plan(false)]).unwrap();
        assert_eq!(host.purge_trash(), 1);
        assert_eq!(names(&host.path("home")), ["u0"]);
    }

    /// What the user left in /tmp goes into a new directory only root can enter (at once,
    /// whatever it holds), and is removed by `purge_trash`; a tenant's own `.kloigos-trash-…`
    /// name is never taken for Kloigos'.
    #[test]
    fn leftovers_in_tmp_are_moved_aside_then_purged() {
        use std::os::unix::fs::{MetadataExt, chown};
        let dir = tempfile::tempdir().unwrap();
        let host = Host::new(dir.path().join("root"));
        let uid = plan(true).uid;
        let tmp = host.path("tmp");
        fs::create_dir_all(tmp.join("x/deep/er")).unwrap();
        fs::write(tmp.join("x/deep/er/f"), "x").unwrap();
        fs::write(tmp.join("f"), "x").unwrap();
        fs::write(tmp.join("other"), "x").unwrap();
        fs::create_dir(tmp.join("shared")).unwrap();
        fs::write(tmp.join("shared/g"), "x").unwrap();
        fs::create_dir(tmp.join(".kloigos-trash-evil")).unwrap();
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o1777)).unwrap();
        fs::set_permissions(tmp.join("shared"), fs::Permissions::from_mode(0o1777)).unwrap();
        for p in ["x", "f", "shared/g", ".kloigos-trash-evil"] {
            chown(tmp.join(p), Some(uid), Some(uid)).unwrap();
        }
        chown(tmp.join("other"), Some(4242), Some(4242)).unwrap();
        chown(tmp.join("shared"), Some(4242), Some(4242)).unwrap();

        host.remove_user_leftovers(&plan(true)).unwrap();
        let left = names(&tmp);
        let aside: Vec<&String> = left
            .iter()
            .filter(|n| n.starts_with(TRASH_PREFIX))
            .collect();
        assert_eq!(aside.len(), 1, "{left:?}");
        let m = fs::symlink_metadata(tmp.join(aside[0])).unwrap();
        assert_eq!((m.uid(), m.mode() & 0o7777), (0, 0o700));
        let mut moved = names(&tmp.join(aside[0]));
        moved.sort();
        assert_eq!(moved, [".kloigos-trash-evil", "f", "x"]);
        assert!(!tmp.join("shared/g").exists());
        assert!(tmp.join("other").exists());

        assert_eq!(host.purge_trash(), 1);
        assert_eq!(names(&tmp), ["other", "shared"]);

        // Only root's private directories are taken for trash a stopped run left.
        fs::create_dir(tmp.join(".kloigos-trash-tenant")).unwrap();
        chown(tmp.join(".kloigos-trash-tenant"), Some(4242), Some(4242)).unwrap();
        fs::create_dir(tmp.join(".kloigos-trash-1-2-3")).unwrap();
        fs::set_permissions(
            tmp.join(".kloigos-trash-1-2-3"),
            fs::Permissions::from_mode(0o700),
        )
        .unwrap();
        host.find_trash([&plan(true)]).unwrap();
        assert_eq!(host.purge_trash(), 1);
        assert_eq!(names(&tmp), [".kloigos-trash-tenant", "other", "shared"]);
    }

    #[test]
    fn fuse_mounts_are_found_under_a_units_directories_only() {
        let info = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 22 0:35 / /home/u0 rw,nosuid,nodev shared:5 - fuse.sshfs me@h: rw,user_id=20000,group_id=20000
41 22 0:36 / /home/u0-3/a\\040b rw,nosuid,nodev - fuse /dev/fuse rw,user_id=20000
42 22 0:37 / /home/u01/x rw - fuse.evil x rw,user_id=20001
43 22 8:2 / /mnt/c0 rw - ext4 /dev/sdb1 rw
44 22 0:38 / /opt/c0/deep/er rw - fuseblk /dev/sdc1 rw,user_id=0
";
        assert_eq!(fuse_mounts_under(info, &["/home/u0"]), ["/home/u0"]);
        assert_eq!(
            fuse_mounts_under(info, &["/opt/c0", "/mnt/c0", "/home/u0-3"]),
            ["/home/u0-3/a b", "/opt/c0/deep/er"]
        );
        assert!(fuse_mounts_under(info, &["/mnt/c0", "/home/u1"]).is_empty());
        assert!(fuse_mounts_under("garbage\n\n1 2 3", &["/home/u0"]).is_empty());
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
        DirFd::open_trusted(&home).unwrap().empty().unwrap();
        assert_eq!(fs::read_dir(&home).unwrap().count(), 0);
        assert!(outside.join("precious").exists());
    }

    #[test]
    fn remove_owned_only_takes_that_uid() {
        let dir = tempfile::tempdir().unwrap();
        let me = nix::unistd::getuid().as_raw();
        fs::create_dir_all(dir.path().join("a/b")).unwrap();
        fs::write(dir.path().join("a/b/mine"), "x").unwrap();
        let d = DirFd::open_trusted(dir.path()).unwrap();
        d.remove_owned(me + 1, true).unwrap();
        assert!(dir.path().join("a/b/mine").exists());
        DirFd::open_trusted(&dir.path().join("a"))
            .unwrap()
            .remove_owned(me, true)
            .unwrap();
        assert!(!dir.path().join("a/b").exists());
    }
}
