//! Directory handles. Everything below a [`DirFd`] is reached relative to it, one component at a
//! time, with `O_NOFOLLOW`: a name that is a symlink is never followed, whatever a tenant swaps
//! in between two calls. Only [`DirFd::open_trusted`] resolves a path, and only for directories
//! no tenant can write (`/home`, `/opt`, `/etc/skel`, `/tmp` itself, ...).

use super::{ApplyError, Result};
use nix::errno::Errno;
use nix::fcntl::{OFlag, openat, renameat};
use nix::sys::stat::{FileStat, Mode, SFlag, fchmod, fstat, fstatat, mkdirat};
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchown, unlinkat};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// How often an operation retries when a tenant keeps changing the entry under it.
const RETRIES: usize = 16;
/// Deepest a removal descends (one open descriptor per level) before it moves the rest up.
const MAX_DEPTH: usize = 64;
/// Passes of [`DirFd::empty`] that move deep directories up: trees up to
/// `MAX_DEPTH * MAX_HOISTS` levels deep go.
const MAX_HOISTS: usize = 1 << 16;
/// Largest file [`DirFd::read_file`] reads.
pub const READ_LIMIT: u64 = 1 << 20;

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn dir_flags() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
}

/// An entry's owner, mode and device (major, minor), from the kernel's cache.
#[derive(Debug, Clone, Copy)]
struct Cached {
    uid: u32,
    mode: u32,
    dev: (u32, u32),
}

/// What one pass of [`DirFd::empty`] left for the next.
#[derive(Default)]
struct Pass {
    hoisted: bool,
    refilled: bool,
}

/// Owner and group to give what Kloigos creates; `None` leaves root's.
pub type Owner = Option<(u32, u32)>;

/// An open directory and the path it was reached by (for messages only: never used to act).
#[derive(Debug)]
pub struct DirFd {
    fd: OwnedFd,
    path: PathBuf,
}

fn is_dir(st: &FileStat) -> bool {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR
}

/// Could `uid` (with its own group, gid = uid) create entries in the directory `st`?
fn writable_by(st: &FileStat, uid: u32) -> bool {
    st.st_mode & 0o002 != 0 || (st.st_gid == uid && st.st_mode & 0o020 != 0) || st.st_uid == uid
}

fn is_file(st: &FileStat) -> bool {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFREG
}

impl DirFd {
    /// Opens a directory no tenant can write, by path (symlinks an admin made are followed).
    pub fn open_trusted(path: &Path) -> Result<DirFd> {
        let fd = nix::fcntl::open(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| err(path, e))?;
        Ok(DirFd {
            fd,
            path: path.to_path_buf(),
        })
    }

    /// Like [`DirFd::open_trusted`], creating the directory (and its parents) first.
    pub fn create_trusted(path: &Path) -> Result<DirFd> {
        std::fs::create_dir_all(path).map_err(|source| ApplyError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        DirFd::open_trusted(path)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn child(&self, name: &OsStr) -> PathBuf {
        self.path.join(name)
    }

    fn err(&self, name: &OsStr, e: Errno) -> ApplyError {
        err(&self.child(name), e)
    }

    pub fn stat(&self) -> Result<FileStat> {
        fstat(&self.fd).map_err(|e| err(&self.path, e))
    }

    /// The entry `name` itself (a symlink is not followed); `None` if there is none.
    pub fn lstat(&self, name: &OsStr) -> Result<Option<FileStat>> {
        match fstatat(&self.fd, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(st)),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(self.err(name, e)),
        }
    }

    /// The entry `name` itself (a symlink is not followed) as the kernel has it cached
    /// (`AT_STATX_DONT_SYNC`): owner, mode and device. A FUSE filesystem's process is never
    /// asked, so a tenant's mount that never answers cannot stall the caller. `None` if missing.
    fn lstat_cached(&self, name: &OsStr) -> std::result::Result<Option<Cached>, Errno> {
        use std::os::fd::AsRawFd;
        let c = std::ffi::CString::new(name.as_bytes()).map_err(|_| Errno::EINVAL)?;
        let mut buf = std::mem::MaybeUninit::<libc::statx>::zeroed();
        // SAFETY: a valid descriptor, a NUL-terminated name and a buffer of the right type,
        // which the kernel fills on success (and which is zeroed anyway).
        let r = unsafe {
            libc::statx(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW | libc::AT_STATX_DONT_SYNC,
                libc::STATX_TYPE | libc::STATX_MODE | libc::STATX_UID,
                buf.as_mut_ptr(),
            )
        };
        if r != 0 {
            return match Errno::last() {
                Errno::ENOENT => Ok(None),
                e => Err(e),
            };
        }
        // SAFETY: zero-initialised plain data, filled by the kernel.
        let st = unsafe { buf.assume_init() };
        Ok(Some(Cached {
            uid: st.stx_uid,
            mode: u32::from(st.stx_mode),
            dev: (st.stx_dev_major, st.stx_dev_minor),
        }))
    }

    /// Opens the subdirectory `name`. A symlink or non-directory there fails (`ELOOP`/`ENOTDIR`).
    pub fn open_dir(&self, name: &OsStr) -> std::result::Result<DirFd, Errno> {
        check_name(name)?;
        let fd = openat(&self.fd, name, dir_flags(), Mode::empty())?;
        Ok(DirFd {
            fd,
            path: self.child(name),
        })
    }

    /// Opens the subdirectory `name` unless something is mounted there (`EXDEV` then), without
    /// ever entering a mount: a path-only handle first (no filesystem is asked to open
    /// anything), its device checked from the kernel's cache, then that very directory opened
    /// through the handle (`.` crosses no mount, whatever is mounted on the name meanwhile).
    pub fn open_dir_nomount(&self, name: &OsStr) -> std::result::Result<DirFd, Errno> {
        check_name(name)?;
        let here = self.lstat_cached(OsStr::new("."))?.ok_or(Errno::ENOENT)?;
        let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let path_only = DirFd {
            fd: openat(&self.fd, name, flags, Mode::empty())?,
            path: self.child(name),
        };
        let st = path_only
            .lstat_cached(OsStr::new("."))?
            .ok_or(Errno::ENOENT)?;
        if st.dev != here.dev {
            return Err(Errno::EXDEV);
        }
        let fd = openat(&path_only.fd, ".", dir_flags(), Mode::empty())?;
        Ok(DirFd {
            fd,
            path: path_only.path,
        })
    }

    /// Opens the subdirectory `name` if it is one; `None` if it is missing, a symlink or not a
    /// directory.
    pub fn open_dir_opt(&self, name: &OsStr) -> Result<Option<DirFd>> {
        match self.open_dir(name) {
            Ok(d) => Ok(Some(d)),
            Err(Errno::ENOENT | Errno::ELOOP | Errno::ENOTDIR) => Ok(None),
            Err(e) => Err(self.err(name, e)),
        }
    }

    /// Refuses a directory owned by anyone but root or `owner`'s uid (root when `None`).
    pub fn check_owner(&self, owner: Owner) -> Result<()> {
        let st = self.stat()?;
        let expected = owner.map_or(0, |(u, _)| u);
        if st.st_uid != 0 && st.st_uid != expected {
            return Err(ApplyError::Conflict(format!(
                "{:?} belongs to uid {}, not {expected}; refusing to touch it",
                self.path, st.st_uid
            )));
        }
        Ok(())
    }

    /// Removes the empty directory `name` (a link there: the link). Missing, or a mount point
    /// (`EBUSY`), is fine.
    pub fn remove_empty_dir(&self, name: &OsStr) -> Result<()> {
        check_name(name).map_err(|e| self.err(name, e))?;
        match unlinkat(&self.fd, name, UnlinkatFlags::RemoveDir) {
            Ok(()) | Err(Errno::ENOENT | Errno::EBUSY) => Ok(()),
            Err(Errno::ENOTDIR) => self.remove_entry(name).map(drop),
            Err(e) => Err(self.err(name, e)),
        }
    }

    /// Refuses a directory owned by anyone but root or `owner`'s uid, then gives it to `owner`
    /// with `mode`. Acts on the open handle only.
    pub fn claim(&self, mode: u32, owner: Owner) -> Result<()> {
        self.check_owner(owner)?;
        if let Some((u, g)) = owner {
            fchown(&self.fd, Some(Uid::from_raw(u)), Some(Gid::from_raw(g)))
                .map_err(|e| err(&self.path, e))?;
        }
        fchmod(&self.fd, Mode::from_bits_truncate(mode)).map_err(|e| err(&self.path, e))?;
        Ok(())
    }

    /// The subdirectory `name`, created if missing; whatever else is there (a symlink, a file)
    /// is removed first. Then claimed with `mode` and `owner` (see [`DirFd::claim`]).
    pub fn ensure_dir(&self, name: &OsStr, mode: u32, owner: Owner) -> Result<DirFd> {
        check_name(name).map_err(|e| self.err(name, e))?;
        for _ in 0..RETRIES {
            match mkdirat(&self.fd, name, Mode::from_bits_truncate(0o700)) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(self.err(name, e)),
            }
            match self.open_dir(name) {
                Ok(d) => {
                    d.claim(mode, owner)?;
                    return Ok(d);
                }
                Err(Errno::ELOOP | Errno::ENOTDIR) => {
                    // Not a directory: remove the entry itself, never what it points to.
                    match unlinkat(&self.fd, name, UnlinkatFlags::NoRemoveDir) {
                        Ok(()) | Err(Errno::ENOENT | Errno::EISDIR) => {}
                        Err(e) => return Err(self.err(name, e)),
                    }
                }
                Err(Errno::ENOENT) => {}
                Err(e) => return Err(self.err(name, e)),
            }
        }
        Err(ApplyError::Conflict(format!(
            "{:?} keeps changing; giving up",
            self.child(name)
        )))
    }

    /// Names in this directory (without `.` and `..`), read through a fresh handle.
    pub fn entries(&self) -> Result<Vec<OsString>> {
        let fd =
            openat(&self.fd, ".", dir_flags(), Mode::empty()).map_err(|e| err(&self.path, e))?;
        let mut dir = nix::dir::Dir::from_fd(fd).map_err(|e| err(&self.path, e))?;
        let mut names = Vec::new();
        for e in dir.iter() {
            let e = e.map_err(|e| err(&self.path, e))?;
            let name = OsStr::from_bytes(e.file_name().to_bytes());
            if name != "." && name != ".." {
                names.push(name.to_os_string());
            }
        }
        Ok(names)
    }

    /// Calls `f` with each name in this directory (without `.` and `..`), read through a fresh
    /// handle as the directory is read: memory stays bounded however many entries a tenant
    /// made, and `f` may remove entries as it goes (a name may then be missed: callers that
    /// must see everything go again). Stops early when `f` returns `false`.
    pub fn for_each_entry(&self, mut f: impl FnMut(&OsStr) -> Result<bool>) -> Result<()> {
        let fd =
            openat(&self.fd, ".", dir_flags(), Mode::empty()).map_err(|e| err(&self.path, e))?;
        let mut dir = nix::dir::Dir::from_fd(fd).map_err(|e| err(&self.path, e))?;
        for e in dir.iter() {
            let e = e.map_err(|e| err(&self.path, e))?;
            let name = OsStr::from_bytes(e.file_name().to_bytes());
            if name != "." && name != ".." && !f(name)? {
                break;
            }
        }
        Ok(())
    }

    /// Reads the regular file `name` (at most [`READ_LIMIT`] bytes); `None` if it is missing
    /// or is anything but a regular file (a symlink, a FIFO, a directory).
    pub fn read_file(&self, name: &OsStr) -> Result<Option<Vec<u8>>> {
        check_name(name).map_err(|e| self.err(name, e))?;
        let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
        let fd = match openat(&self.fd, name, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::ENOENT | Errno::ELOOP | Errno::ENXIO | Errno::EISDIR) => return Ok(None),
            Err(e) => return Err(self.err(name, e)),
        };
        let st = fstat(&fd).map_err(|e| self.err(name, e))?;
        if !is_file(&st) {
            return Ok(None);
        }
        let mut buf = Vec::new();
        File::from(fd)
            .take(READ_LIMIT)
            .read_to_end(&mut buf)
            .map_err(|source| ApplyError::Io {
                path: self.child(name),
                source,
            })?;
        Ok(Some(buf))
    }

    /// Replaces `name` atomically: a new temporary file in this directory, written, given
    /// `mode` and `owner` through its descriptor, synced, then renamed over `name`.
    pub fn write_file(&self, name: &OsStr, content: &[u8], mode: u32, owner: Owner) -> Result<()> {
        check_name(name).map_err(|e| self.err(name, e))?;
        let mut tmp = OsString::from(".");
        tmp.push(name);
        tmp.push(format!(
            ".kloigos-{}-{}",
            std::process::id(),
            TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let (file, _) = self.create_file(&tmp, mode)?;
        let done = (|| -> std::result::Result<(), Errno> {
            let mut f = file;
            f.write_all(content).map_err(errno_of)?;
            fchmod(&f, Mode::from_bits_truncate(mode))?;
            if let Some((u, g)) = owner {
                fchown(&f, Some(Uid::from_raw(u)), Some(Gid::from_raw(g)))?;
            }
            f.sync_all().map_err(errno_of)?;
            renameat(&self.fd, tmp.as_os_str(), &self.fd, name)?;
            nix::unistd::fsync(&self.fd)
        })();
        if let Err(e) = done {
            // The temporary name may now be anything a tenant put there: unlinking a name
            // never follows it.
            let _ = unlinkat(&self.fd, tmp.as_os_str(), UnlinkatFlags::NoRemoveDir);
            return Err(self.err(name, e));
        }
        Ok(())
    }

    /// Creates the new regular file `name` (`O_EXCL`, never through a symlink).
    fn create_file(&self, name: &OsStr, mode: u32) -> Result<(File, ())> {
        let flags =
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let fd = openat(
            &self.fd,
            name,
            flags,
            Mode::from_bits_truncate(mode & 0o700),
        )
        .map_err(|e| self.err(name, e))?;
        Ok((File::from(fd), ()))
    }

    /// Copies `src` into the new file `name` unless something is already there (returns
    /// false then: an existing entry is never written through).
    pub fn copy_new_file(
        &self,
        name: &OsStr,
        src: &mut File,
        mode: u32,
        owner: Owner,
    ) -> Result<bool> {
        let mut dst = match self.create_file(name, mode) {
            Ok((f, ())) => f,
            Err(ApplyError::Io { source, .. }) if source.raw_os_error() == Some(libc::EEXIST) => {
                return Ok(false);
            }
            Err(e) => return Err(e),
        };
        let r = (|| -> std::result::Result<(), Errno> {
            io::copy(src, &mut dst).map_err(errno_of)?;
            fchmod(&dst, Mode::from_bits_truncate(mode))?;
            if let Some((u, g)) = owner {
                fchown(&dst, Some(Uid::from_raw(u)), Some(Gid::from_raw(g)))?;
            }
            Ok(())
        })();
        r.map_err(|e| self.err(name, e))?;
        Ok(true)
    }

    /// Removes the entry `name`, whatever it is (a directory with everything in it, never
    /// following a symlink nor crossing into another filesystem). Returns whether it existed.
    pub fn remove_entry(&self, name: &OsStr) -> Result<bool> {
        check_name(name).map_err(|e| self.err(name, e))?;
        for _ in 0..RETRIES {
            match unlinkat(&self.fd, name, UnlinkatFlags::NoRemoveDir) {
                Ok(()) => return Ok(true),
                Err(Errno::ENOENT) => return Ok(false),
                Err(Errno::EISDIR) => {}
                Err(e) => return Err(self.err(name, e)),
            }
            let sub = match self.open_dir_nomount(name) {
                Ok(d) => d,
                Err(Errno::ENOENT) => return Ok(false),
                Err(Errno::EXDEV) => return Err(mounted(&self.child(name))),
                // Swapped for a non-directory meanwhile: unlink again.
                Err(Errno::ELOOP | Errno::ENOTDIR) => continue,
                Err(e) => return Err(self.err(name, e)),
            };
            self.same_fs(&sub)?;
            sub.empty()?;
            match unlinkat(&self.fd, name, UnlinkatFlags::RemoveDir) {
                Ok(()) => return Ok(true),
                Err(Errno::ENOENT) => return Ok(false),
                // Refilled or swapped meanwhile: go again.
                Err(Errno::ENOTEMPTY | Errno::EEXIST | Errno::ENOTDIR) => {}
                Err(e) => return Err(self.err(name, e)),
            }
        }
        Err(ApplyError::Conflict(format!(
            "{:?} keeps changing; giving up",
            self.child(name)
        )))
    }

    /// Refuses to descend into something mounted in the tree (a tenant's FUSE mount, say):
    /// that is left to an admin.
    fn same_fs(&self, sub: &DirFd) -> Result<()> {
        if sub.stat()?.st_dev != self.stat()?.st_dev {
            return Err(mounted(&sub.path));
        }
        Ok(())
    }

    /// Moves the subdirectory `name` (open as `sub`) out of the way, in O(1) whatever it holds:
    /// it is given to root with mode 0700 (nobody, a later holder of the same uid included, can
    /// enter it any more), then renamed to a new hidden name starting with `prefix` in this
    /// directory. Returns that name, or `None` when it is a mount point, which stays where it
    /// is (its content is the caller's to empty in place). This directory must be one no
    /// tenant can write.
    pub fn move_aside(&self, name: &OsStr, sub: &DirFd, prefix: &str) -> Result<Option<OsString>> {
        check_name(name).map_err(|e| self.err(name, e))?;
        if sub.stat()?.st_dev != self.stat()?.st_dev {
            return Ok(None);
        }
        fchown(&sub.fd, Some(Uid::from_raw(0)), Some(Gid::from_raw(0)))
            .map_err(|e| err(&sub.path, e))?;
        fchmod(&sub.fd, Mode::from_bits_truncate(0o700)).map_err(|e| err(&sub.path, e))?;
        let mut aside = OsString::from(prefix);
        aside.push(name);
        aside.push(format!(
            "-{}-{}",
            std::process::id(),
            TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        match renameat(&self.fd, name, &self.fd, aside.as_os_str()) {
            Ok(()) => Ok(Some(aside)),
            // A bind mount on the same filesystem.
            Err(Errno::EBUSY) => Ok(None),
            Err(e) => Err(self.err(name, e)),
        }
    }

    /// Removes everything inside this directory (not the directory itself), in passes over
    /// its entries. A tree of any depth goes with a bounded number of open descriptors: a
    /// directory [`MAX_DEPTH`] levels down is first moved up into this one, then removed by a
    /// later pass.
    pub fn empty(&self) -> Result<()> {
        let (mut hoists, mut races) = (0usize, 0usize);
        loop {
            let mut pass = Pass::default();
            self.for_each_entry(|name| {
                self.clear(name, self, 0, &mut pass)?;
                Ok(true)
            })?;
            if pass.hoisted {
                hoists += 1;
            } else if pass.refilled {
                races += 1;
            } else {
                return Ok(());
            }
            if hoists > MAX_HOISTS || races > RETRIES {
                return Err(ApplyError::Conflict(format!(
                    "{:?} keeps changing; giving up",
                    self.path
                )));
            }
        }
    }

    /// Removes the entry `name` of this directory, `depth` levels below `top`.
    fn clear(&self, name: &OsStr, top: &DirFd, depth: usize, pass: &mut Pass) -> Result<()> {
        match unlinkat(&self.fd, name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => return Ok(()),
            Err(Errno::EISDIR) => {}
            Err(e) => return Err(self.err(name, e)),
        }
        if depth >= MAX_DEPTH {
            let hoisted = OsString::from(format!(
                ".kloigos-deep-{}-{}",
                std::process::id(),
                TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
            ));
            renameat(&self.fd, name, &top.fd, hoisted.as_os_str())
                .map_err(|e| self.err(name, e))?;
            pass.hoisted = true;
            return Ok(());
        }
        let sub = match self.open_dir_nomount(name) {
            Ok(d) => d,
            Err(Errno::ENOENT) => return Ok(()),
            Err(Errno::EXDEV) => return Err(mounted(&self.child(name))),
            Err(Errno::ELOOP | Errno::ENOTDIR) => {
                // Swapped for a non-directory since: the next pass takes it.
                pass.refilled = true;
                return Ok(());
            }
            Err(e) => return Err(self.err(name, e)),
        };
        self.same_fs(&sub)?;
        sub.for_each_entry(|n| {
            sub.clear(n, top, depth + 1, pass)?;
            Ok(true)
        })?;
        match unlinkat(&self.fd, name, UnlinkatFlags::RemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(Errno::ENOTEMPTY | Errno::EEXIST | Errno::ENOTDIR) => {
                pass.refilled = true;
                Ok(())
            }
            Err(e) => Err(self.err(name, e)),
        }
    }

    /// Removes the entries owned by `uid`; with `recurse`, also inside directories it does not
    /// own, on the same filesystem (a user's file in a shared directory such as /tmp). Only
    /// directories `uid` could have written are searched (writable by all, or by its group,
    /// which is its own: a unit's group has the unit's uid as gid): another tenant's private
    /// tree, however large, costs nothing here.
    pub fn remove_owned(&self, uid: u32, recurse: bool) -> Result<()> {
        self.remove_owned_at(uid, recurse, 0, None)
    }

    /// Like [`DirFd::remove_owned`], but what `uid` owns right in this directory is moved into
    /// `aside` (a directory on the same filesystem only root can enter) instead: O(1) each,
    /// whatever it holds, and a mount point in it (a tenant's FUSE mount) cannot make this
    /// fail. `uid`'s entries deeper down (in directories of others) are removed in place. A
    /// dead FUSE mount (`ENOTCONN`), whoever made it, is left alone with a warning.
    pub fn move_owned_aside(&self, uid: u32, aside: &DirFd) -> Result<()> {
        self.remove_owned_at(uid, true, 0, Some(aside))
    }

    fn remove_owned_at(
        &self,
        uid: u32,
        recurse: bool,
        depth: usize,
        aside: Option<&DirFd>,
    ) -> Result<()> {
        let Some(here) = self
            .lstat_cached(OsStr::new("."))
            .map_err(|e| err(&self.path, e))?
        else {
            return Ok(());
        };
        let dev = here.dev;
        self.for_each_entry(|name| {
            // Never entered to look: a mount (another user's FUSE mount may never answer).
            let st = match self.lstat_cached(name) {
                Ok(Some(st)) => st,
                Ok(None) => return Ok(true),
                Err(e) => return Err(self.err(name, e)),
            };
            if st.dev != dev {
                tracing::warn!(path = ?self.child(name), "a mount point in a shared directory: left alone");
                return Ok(true);
            }
            if st.uid == uid {
                let moved = aside.is_some_and(|a| {
                    match renameat(&self.fd, name, &a.fd, name) {
                        Ok(()) => true,
                        Err(e) => {
                            tracing::warn!(path = ?self.child(name), error = %crate::error::Chain(&e), "cannot move aside; removing in place");
                            false
                        }
                    }
                });
                if !moved {
                    self.remove_entry(name)?;
                }
            } else if recurse && st.mode & libc::S_IFMT == libc::S_IFDIR && depth < MAX_DEPTH {
                // Opened without following and without entering a mount: swapped for a link
                // or a mount meanwhile, it is skipped. The mode is checked on the open handle.
                match self.open_dir_nomount(name) {
                    Ok(sub) => {
                        if writable_by(&sub.stat()?, uid) {
                            sub.remove_owned_at(uid, true, depth + 1, None)?;
                        }
                    }
                    Err(Errno::ENOENT | Errno::ELOOP | Errno::ENOTDIR | Errno::EXDEV) => {}
                    Err(e) => return Err(self.err(name, e)),
                }
            }
            Ok(true)
        })
    }

    /// A new, empty directory named `prefix` + a fresh suffix in this directory, root's with
    /// mode 0700 (in a sticky directory such as /tmp nobody else can rename or remove it).
    pub fn new_private_dir(&self, prefix: &str) -> Result<(OsString, DirFd)> {
        for _ in 0..RETRIES {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            let name = OsString::from(format!(
                "{prefix}{}-{}-{nanos:x}",
                std::process::id(),
                TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
            ));
            match mkdirat(&self.fd, name.as_os_str(), Mode::from_bits_truncate(0o700)) {
                Ok(()) => {}
                Err(Errno::EEXIST) => continue,
                Err(e) => return Err(self.err(&name, e)),
            }
            let d = self.open_dir(&name).map_err(|e| self.err(&name, e))?;
            let st = d.stat()?;
            if st.st_uid != 0 || st.st_mode & 0o077 != 0 {
                return Err(ApplyError::Conflict(format!(
                    "{:?} is not root's private directory",
                    d.path
                )));
            }
            return Ok((name, d));
        }
        Err(ApplyError::Conflict(format!(
            "cannot make a private directory in {:?}",
            self.path
        )))
    }

    /// Copies the tree under `src` into this directory: directories are created (kept when
    /// they exist), files only where no entry exists yet; links and special files are skipped.
    pub fn copy_tree_from(&self, src: &DirFd, owner: Owner) -> Result<()> {
        self.copy_tree_at(src, owner, 0)
    }

    fn copy_tree_at(&self, src: &DirFd, owner: Owner, depth: usize) -> Result<()> {
        if depth > MAX_DEPTH {
            return Ok(());
        }
        for name in src.entries()? {
            let Some(st) = src.lstat(&name)? else {
                continue;
            };
            let mode = st.st_mode & 0o7777;
            if is_dir(&st) {
                let Some(from) = src.open_dir_opt(&name)? else {
                    continue;
                };
                let to = self.ensure_dir(&name, mode, owner)?;
                to.copy_tree_at(&from, owner, depth + 1)?;
            } else if is_file(&st) {
                let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
                let fd = openat(&src.fd, name.as_os_str(), flags, Mode::empty())
                    .map_err(|e| src.err(&name, e))?;
                self.copy_new_file(&name, &mut File::from(fd), mode, owner)?;
            }
        }
        Ok(())
    }
}

fn mounted(path: &Path) -> ApplyError {
    ApplyError::Conflict(format!("{path:?} is a mount point; not removing it"))
}

/// One path component: not empty, not `.` or `..`, no `/`.
fn check_name(name: &OsStr) -> std::result::Result<(), Errno> {
    let b = name.as_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') {
        return Err(Errno::EINVAL);
    }
    Ok(())
}

fn errno_of(e: io::Error) -> Errno {
    e.raw_os_error().map_or(Errno::EIO, Errno::from_raw)
}

fn err(path: &Path, e: Errno) -> ApplyError {
    ApplyError::Io {
        path: path.to_path_buf(),
        source: io::Error::from(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};

    #[test]
    fn ensure_dir_replaces_links_and_files_without_following() {
        let t = tempfile::tempdir().unwrap();
        let outside = t.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("f"), "x").unwrap();
        let home = t.path().join("home");
        fs::create_dir(&home).unwrap();
        symlink(&outside, home.join(".ssh")).unwrap();
        let h = DirFd::open_trusted(&home).unwrap();
        let ssh = h.ensure_dir(OsStr::new(".ssh"), 0o700, None).unwrap();
        ssh.write_file(OsStr::new("authorized_keys"), b"k\n", 0o600, None)
            .unwrap();
        assert!(fs::symlink_metadata(home.join(".ssh")).unwrap().is_dir());
        assert_eq!(fs::read(home.join(".ssh/authorized_keys")).unwrap(), b"k\n");
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 1);
        // A file in its place is replaced too.
        fs::remove_dir_all(home.join(".ssh")).unwrap();
        fs::write(home.join(".ssh"), "not a dir").unwrap();
        h.ensure_dir(OsStr::new(".ssh"), 0o700, None).unwrap();
        let m = fs::symlink_metadata(home.join(".ssh")).unwrap();
        assert!(m.is_dir());
        assert_eq!(m.permissions().mode() & 0o777, 0o700);
    }

    #[test]
    fn claim_refuses_a_stranger_directory() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("d");
        fs::create_dir(&d).unwrap();
        std::os::unix::fs::chown(&d, Some(4242), Some(4242)).unwrap();
        let h = DirFd::open_trusted(t.path()).unwrap();
        let e = h.ensure_dir(OsStr::new("d"), 0o750, Some((5000, 5000)));
        assert!(matches!(e, Err(ApplyError::Conflict(_))), "{e:?}");
        assert_eq!(fs::metadata(&d).unwrap().uid(), 4242);
        h.ensure_dir(OsStr::new("d"), 0o750, Some((4242, 4242)))
            .unwrap();
    }

    #[test]
    fn reads_and_copies_never_go_through_links_or_fifos() {
        let t = tempfile::tempdir().unwrap();
        let secret = t.path().join("secret");
        fs::write(&secret, "s").unwrap();
        fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
        let d = t.path().join("d");
        fs::create_dir(&d).unwrap();
        symlink(&secret, d.join("link")).unwrap();
        nix::unistd::mkfifo(&d.join("fifo"), Mode::from_bits_truncate(0o600)).unwrap();
        let h = DirFd::open_trusted(&d).unwrap();
        assert_eq!(h.read_file(OsStr::new("link")).unwrap(), None);
        assert_eq!(h.read_file(OsStr::new("fifo")).unwrap(), None);
        assert_eq!(h.read_file(OsStr::new("missing")).unwrap(), None);
        // A skeleton copy onto a planted link leaves the link's target alone.
        let skel = t.path().join("skel");
        fs::create_dir_all(skel.join("sub")).unwrap();
        fs::write(skel.join("link"), "skeleton").unwrap();
        fs::write(skel.join("sub/f"), "g").unwrap();
        h.copy_tree_from(&DirFd::open_trusted(&skel).unwrap(), None)
            .unwrap();
        assert_eq!(fs::read(&secret).unwrap(), b"s");
        assert_eq!(
            fs::metadata(&secret).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(fs::read(d.join("sub/f")).unwrap(), b"g");
    }

    #[test]
    fn empty_takes_a_tree_deeper_than_the_descriptor_budget() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("d");
        let mut deep = d.clone();
        for _ in 0..(MAX_DEPTH * 3 + 5) {
            deep.push("x");
        }
        fs::create_dir_all(&deep).unwrap();
        fs::write(deep.join("f"), "x").unwrap();
        let h = DirFd::open_trusted(&d).unwrap();
        h.empty().unwrap();
        assert_eq!(fs::read_dir(&d).unwrap().count(), 0);
    }

    /// Leftovers of uid 5000 in a shared /tmp: searched for only where 5000 could write, so
    /// another tenant's private tree (any size) is never walked under the host lock.
    #[test]
    fn remove_owned_searches_only_directories_the_user_could_write() {
        use std::os::unix::fs::chown;
        let t = tempfile::tempdir().unwrap();
        let tmp = t.path();
        let mk = |rel: &str, mode: u32, uid: u32, gid: u32| {
            let p = tmp.join(rel);
            fs::create_dir(&p).unwrap();
            chown(&p, Some(uid), Some(gid)).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        };
        let file = |rel: &str, uid: u32| {
            let p = tmp.join(rel);
            fs::write(&p, "x").unwrap();
            chown(&p, Some(uid), Some(uid)).unwrap();
        };
        mk("shared", 0o1777, 4242, 4242);
        file("shared/left", 5000);
        file("shared/other", 4242);
        mk("group", 0o2770, 4242, 5000);
        file("group/left", 5000);
        mk("private", 0o755, 4242, 4242);
        mk("private/deep", 0o777, 4242, 4242);
        file("private/deep/unreachable", 5000);
        mk("own", 0o700, 5000, 5000);
        file("own/f", 5000);
        file("top", 5000);
        DirFd::open_trusted(tmp)
            .unwrap()
            .remove_owned(5000, true)
            .unwrap();
        for gone in ["shared/left", "group/left", "own", "top"] {
            assert!(fs::symlink_metadata(tmp.join(gone)).is_err(), "{gone} left");
        }
        for kept in ["shared/other", "private/deep/unreachable"] {
            assert!(tmp.join(kept).exists(), "{kept} removed");
        }
    }

    /// Entries are removed while the directory is read (memory does not grow with their
    /// number): nothing is missed, in wide directories on every level.
    #[test]
    fn empty_removes_while_reading_and_misses_nothing() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("d");
        let long = "n".repeat(200);
        for i in 0..40 {
            let sub = d.join(format!("{i}-{long}"));
            fs::create_dir_all(&sub).unwrap();
            for j in 0..100 {
                fs::write(sub.join(format!("{j}-{long}")), "").unwrap();
            }
            fs::write(d.join(format!("f{i}-{long}")), "").unwrap();
        }
        let h = DirFd::open_trusted(&d).unwrap();
        h.empty().unwrap();
        assert_eq!(fs::read_dir(&d).unwrap().count(), 0);
        let mut seen = 0;
        h.for_each_entry(|_| {
            seen += 1;
            Ok(true)
        })
        .unwrap();
        assert_eq!(seen, 0);
    }

    /// A mount in a shared directory (a tenant's FUSE mount, here a tmpfs made to look like
    /// one of uid 5000's) is neither entered nor a reason to fail: it is left, the rest goes.
    /// Needs root with CAP_SYS_ADMIN (to mount); says so and passes without it.
    #[test]
    fn leftovers_skip_mounts_without_entering_them() {
        let t = tempfile::tempdir().unwrap();
        let tmp = t.path().join("tmp");
        let m = tmp.join("m");
        fs::create_dir_all(&m).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "uid=5000,mode=0700", "kloigos-test"])
            .arg(&m)
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            eprintln!("cannot mount a tmpfs here: test skipped");
            return;
        }
        let umount = scopeguard(&m);
        fs::write(m.join("inside"), "x").unwrap();
        fs::write(tmp.join("f"), "x").unwrap();
        std::os::unix::fs::chown(tmp.join("f"), Some(5000), Some(5000)).unwrap();
        let d = DirFd::open_trusted(&tmp).unwrap();
        fs::create_dir(tmp.join("plain")).unwrap();
        assert_eq!(
            d.open_dir_nomount(OsStr::new("m")).map(drop),
            Err(Errno::EXDEV)
        );
        assert!(d.open_dir_nomount(OsStr::new("plain")).is_ok());
        d.remove_owned(5000, true).unwrap();
        assert!(!tmp.join("f").exists());
        assert!(m.join("inside").exists());
        // A tree with a mount inside is refused, not entered.
        let e = d.remove_entry(OsStr::new("m"));
        assert!(matches!(e, Err(ApplyError::Conflict(_))), "{e:?}");
        drop(umount);
    }

    /// Unmounts `path` when dropped (a failed assertion too).
    fn scopeguard(path: &Path) -> impl Drop {
        struct Umount(PathBuf);
        impl Drop for Umount {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount").arg(&self.0).status();
            }
        }
        Umount(path.to_path_buf())
    }

    #[test]
    fn remove_entry_takes_trees_and_links_not_targets() {
        let t = tempfile::tempdir().unwrap();
        let outside = t.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("keep"), "x").unwrap();
        let d = t.path().join("d");
        fs::create_dir_all(d.join("a/b/c")).unwrap();
        fs::write(d.join("a/b/c/f"), "x").unwrap();
        symlink(&outside, d.join("a/b/link")).unwrap();
        symlink(&outside, d.join("top")).unwrap();
        let h = DirFd::open_trusted(&d).unwrap();
        assert!(h.remove_entry(OsStr::new("a")).unwrap());
        assert!(!h.remove_entry(OsStr::new("a")).unwrap());
        h.empty().unwrap();
        assert_eq!(fs::read_dir(&d).unwrap().count(), 0);
        assert!(outside.join("keep").exists());
        assert!(h.remove_entry(OsStr::new("..")).is_err());
    }
}
