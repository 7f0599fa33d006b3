#!/usr/bin/env python3
"""A hostile tenant, for race tests of Kloigos' host file operations.

    python3 tests/race/tenant.py --home DIR --target DIR [--seconds N]

Until killed or N seconds pass, in two processes:

(a) the swapper keeps exchanging DIR/.ssh between a real directory and a symlink to TARGET
    (renameat2(RENAME_EXCHANGE) with DIR/.ssh.swap). Every ~0.5 s it leaves, for 0.15 s, a
    home holding nothing but a real .ssh (the bait for a skeleton copy) and then resumes;
(b) the planter watches DIR (and every .ssh directory) with inotify and replaces each new
    entry root creates with a symlink to TARGET/<same name> (a directory is moved aside first);
(c) it deletes DIR/.ssh/authorized_keys whenever it appears, so reconcile keeps rewriting it.

Python 3 standard library and ctypes only. Prints nothing but errors; exits 0.
"""

import argparse
import ctypes
import ctypes.util
import errno
import os
import select
import shutil
import signal
import stat
import struct
import sys
import time

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

AT_FDCWD = -100
RENAME_EXCHANGE = 1 << 1
PR_SET_PDEATHSIG = 1

IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_IGNORED = 0x00008000
IN_ISDIR = 0x40000000
IN_ONLYDIR = 0x01000000
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
EVENT = struct.Struct("iIII")

SSH = ".ssh"
SWAP = ".ssh.swap"
ASIDE = ".tenant-aside-"
LINK_TMP = ".tenant-link-"

# Errors a race with root produces all the time: not worth a word.
QUIET = {errno.ENOENT, errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.ENOTEMPTY,
         errno.ELOOP, errno.EINVAL, errno.EBUSY}


def complain(e):
    if not (isinstance(e, OSError) and e.errno in QUIET):
        print(f"tenant.py: {e!r}", file=sys.stderr)


def exchange(a, b):
    r = libc.renameat2(AT_FDCWD, a.encode(), AT_FDCWD, b.encode(), RENAME_EXCHANGE)
    if r != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def kind(path):
    try:
        m = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(m):
        return "link"
    if stat.S_ISDIR(m):
        return "dir"
    return "other"


def remove(path):
    k = kind(path)
    if k == "dir":
        shutil.rmtree(path, ignore_errors=True)  # never follows links
    elif k is not None:
        os.unlink(path)


def make(path, what, target):
    if what == "dir":
        os.mkdir(path, 0o700)
    else:
        os.symlink(target, path)


def ensure_pair(home, target):
    """One of .ssh/.ssh.swap a real directory, the other a symlink to TARGET."""
    ssh, swap = os.path.join(home, SSH), os.path.join(home, SWAP)
    a, b = kind(ssh), kind(swap)
    if a == "other":
        os.unlink(ssh)
        a = None
    if b == "other":
        os.unlink(swap)
        b = None
    if a is not None and a == b:
        remove(swap)
        b = None
    if a is None and b is None:
        make(ssh, "dir", target)
        make(swap, "link", target)
    elif a is None:
        make(ssh, "dir" if b == "link" else "link", target)
    elif b is None:
        make(swap, "dir" if a == "link" else "link", target)


def bait(home, target):
    """A home holding nothing but a real .ssh, without a key."""
    ssh = os.path.join(home, SSH)
    if kind(ssh) != "dir":
        remove(ssh)
        os.mkdir(ssh, 0o700)
    for name in os.listdir(home):
        if name != SSH:
            try:
                remove(os.path.join(home, name))
            except OSError as e:
                complain(e)
    for name in os.listdir(ssh):
        try:
            remove(os.path.join(ssh, name))
        except OSError as e:
            complain(e)


def swapper(home, target, deadline):
    ssh, swap = os.path.join(home, SSH), os.path.join(home, SWAP)
    next_bait = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        try:
            if time.monotonic() >= next_bait:
                bait(home, target)
                time.sleep(0.15)
                next_bait = time.monotonic() + 0.5
            ensure_pair(home, target)
            for _ in range(500):
                exchange(ssh, swap)
        except OSError as e:
            complain(e)


class Planter:
    def __init__(self, home, target):
        self.home, self.target = home, target
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.fd = fd
        self.dirs = {}  # watch descriptor -> (directory fd, is home)
        self.counter = 0
        self.watch(os.open(home, os.O_RDONLY | os.O_DIRECTORY), True)

    def watch(self, dfd, is_home):
        # The directory is already open without following; /proc/self/fd/N must be followed.
        mask = IN_CREATE | IN_MOVED_TO | IN_ONLYDIR
        wd = libc.inotify_add_watch(self.fd, f"/proc/self/fd/{dfd}".encode(), mask)
        if wd < 0 or wd in self.dirs:
            os.close(dfd)
            return
        self.dirs[wd] = (dfd, is_home)

    def watch_ssh(self, dfd, name):
        try:
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd)
        except OSError:
            return
        self.watch(sub, False)

    def plant(self, dfd, name):
        """Replaces `name` (made by root) with a link to TARGET/name."""
        st = os.lstat(name, dir_fd=dfd)
        if stat.S_ISLNK(st.st_mode):
            return
        self.counter += 1
        if stat.S_ISDIR(st.st_mode):
            os.rename(name, f"{ASIDE}{self.counter}", src_dir_fd=dfd, dst_dir_fd=dfd)
        tmp = f"{LINK_TMP}{self.counter}"
        os.symlink(os.path.join(self.target, name), tmp, dir_fd=dfd)
        os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)

    def handle(self, wd, mask, name):
        if mask & IN_IGNORED:
            entry = self.dirs.pop(wd, None)
            if entry:
                os.close(entry[0])
            return
        entry = self.dirs.get(wd)
        if entry is None or not name:
            return
        dfd, is_home = entry
        if is_home and name in (SSH, SWAP):
            if mask & IN_ISDIR:
                self.watch_ssh(dfd, name)
            return
        if name.startswith(ASIDE) or name.startswith(LINK_TMP):
            return
        if not is_home and name == "authorized_keys":
            os.unlink(name, dir_fd=dfd)
            return
        self.plant(dfd, name)

    def run(self, deadline):
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            ready, _, _ = select.select([self.fd], [], [], min(left, 0.2))
            if not ready:
                # Pick up .ssh directories made while the queue overflowed.
                for name in (SSH, SWAP):
                    self.watch_ssh(self.dirs_home(), name)
                continue
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                continue
            off = 0
            while off + EVENT.size <= len(buf):
                wd, mask, _cookie, length = EVENT.unpack_from(buf, off)
                raw = buf[off + EVENT.size: off + EVENT.size + length]
                off += EVENT.size + length
                name = raw.split(b"\0", 1)[0].decode(errors="surrogateescape")
                try:
                    self.handle(wd, mask, name)
                except OSError as e:
                    complain(e)

    def dirs_home(self):
        for dfd, is_home in self.dirs.values():
            if is_home:
                return dfd
        return AT_FDCWD


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", required=True)
    ap.add_argument("--target", required=True)
    ap.add_argument("--seconds", type=float, default=None)
    args = ap.parse_args()
    home = os.path.abspath(args.home)
    target = os.path.abspath(args.target)
    deadline = time.monotonic() + (args.seconds if args.seconds is not None else 10 ** 9)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))

    child = os.fork()
    if child == 0:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == 1:
            os._exit(0)
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
        try:
            swapper(home, target, deadline)
        except Exception as e:  # noqa: BLE001 - the tenant must outlive any surprise
            complain(e)
        os._exit(0)
    try:
        try:
            Planter(home, target).run(deadline)
        except Exception as e:  # noqa: BLE001
            complain(e)
    finally:
        try:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
        except OSError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
