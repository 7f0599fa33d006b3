#!/usr/bin/env python3
"""A hostile tenant for race tests (python3 stdlib only), run as a unit's user.

    python3 tenant.py --home DIR --target DIR [--seconds N]

For N seconds (default 60) it
  - keeps swapping DIR/.ssh between a directory and a symlink to TARGET (renameat2
    RENAME_EXCHANGE, so DIR/.ssh always exists, as one or the other);
  - watches DIR with inotify and, for every entry someone else (root) creates there, swaps it with
    a symlink to TARGET/<name>;
  - deletes DIR/.ssh/authorized_keys whenever it appears.
Root acting by path inside DIR would then write, chown or delete in TARGET. Prints a count of
each action at the end.
"""
import argparse
import ctypes
import errno
import os
import select
import struct
import time

AT_FDCWD = -100
RENAME_EXCHANGE = 2
IN_CREATE = 0x100
IN_MOVED_TO = 0x80
IN_NONBLOCK = 0o4000
OURS = (".ssh", ".tenant-alt", ".tenant-plant")

libc = ctypes.CDLL(None, use_errno=True)


def exchange(a, b):
    if libc.renameat2(AT_FDCWD, a.encode(), AT_FDCWD, b.encode(), RENAME_EXCHANGE) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), a)


def quietly(f, *args):
    try:
        f(*args)
        return True
    except OSError:
        return False


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--home", required=True)
    ap.add_argument("--target", required=True)
    ap.add_argument("--seconds", type=float, default=60)
    a = ap.parse_args()
    home, target = a.home, a.target
    ssh, alt, plant = (os.path.join(home, n) for n in OURS)
    counts = {"swaps": 0, "planted": 0, "keys_deleted": 0}

    fd = libc.inotify_init1(IN_NONBLOCK)
    if fd < 0 or libc.inotify_add_watch(fd, home.encode(), IN_CREATE | IN_MOVED_TO) < 0:
        raise OSError(ctypes.get_errno(), "inotify on " + home)

    end = time.monotonic() + a.seconds
    while time.monotonic() < end:
        # DIR/.ssh and DIR/.tenant-alt: one a directory, the other a symlink to TARGET.
        if not os.path.lexists(ssh):
            quietly(os.mkdir, ssh, 0o700)
        if not os.path.lexists(alt):
            if os.path.islink(ssh):
                quietly(os.mkdir, alt, 0o700)
            else:
                quietly(os.symlink, target, alt)
        if quietly(exchange, ssh, alt):
            counts["swaps"] += 1
        if not os.path.islink(ssh) and quietly(os.unlink, os.path.join(ssh, "authorized_keys")):
            counts["keys_deleted"] += 1
        # Entries root created: swap each with a symlink into TARGET.
        if select.select([fd], [], [], 0.001)[0]:
            try:
                buf = os.read(fd, 65536)
            except OSError as e:
                if e.errno != errno.EAGAIN:
                    raise
                buf = b""
            i = 0
            while i + 16 <= len(buf):
                _, _, _, n = struct.unpack_from("iIII", buf, i)
                name = buf[i + 16:i + 16 + n].split(b"\0", 1)[0].decode(errors="replace")
                i += 16 + n
                if not name or name in OURS:
                    continue
                try:  # our own plant (an exchange reports a move into DIR)
                    if os.readlink(os.path.join(home, name)) == os.path.join(target, name):
                        continue
                except OSError:
                    pass
                quietly(os.unlink, plant)
                if quietly(os.symlink, os.path.join(target, name), plant) and quietly(
                    exchange, plant, os.path.join(home, name)
                ):
                    counts["planted"] += 1
    print(" ".join(f"{k}={v}" for k, v in counts.items()), flush=True)


if __name__ == "__main__":
    main()
