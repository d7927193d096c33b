"""Kernel-enforced offline mode: run a command in a new network namespace, where the only interface is
loopback, so nothing in it (a C library calling connect(2) included) can reach the network.

    code = isolate.run_isolated([sys.executable, "-m", "forge_rt.train", ...])

Needs root, or unprivileged user namespaces (then a user namespace mapping only the caller's own uid and
gid is created with it). Where the system allows neither, `IsolationError` says so plainly. The Python
guard (`guard.offline`) stays the portable layer underneath."""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import signal
import socket
import struct
import subprocess
import sys

from forge_rt.core.errors import ForgeError

ENV = "FORGE_RT_ISOLATED"   # set in the isolated child, so it does not isolate itself again
CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1
_IFREQ = struct.Struct("16sH22x")


class IsolationError(ForgeError, OSError):
    """The system does not allow a new network namespace here."""


def inside() -> bool:
    """Whether this process runs in the namespace that run_isolated made."""
    return os.environ.get(ENV) == "1"


def _write(path: str, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)


def _loopback_up() -> None:
    # A new namespace's lo is down; local services (loopback sockets) need it up.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = _IFREQ.unpack(fcntl.ioctl(s, _SIOCGIFFLAGS, _IFREQ.pack(b"lo", 0)))[1]
        fcntl.ioctl(s, _SIOCSIFFLAGS, _IFREQ.pack(b"lo", flags | _IFF_UP))


def _enter(uid: int, gid: int) -> None:
    """Moves the calling (single-threaded, just forked) process into a new network namespace."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET if uid == 0 else CLONE_NEWUSER | CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    if uid != 0:
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1")
        _write("/proc/self/gid_map", f"{gid} {gid} 1")
    _loopback_up()


def check_available() -> None:
    """Raises IsolationError, saying why, when a network namespace cannot be made here (tried in a child)."""
    uid, gid = os.getuid(), os.getgid()
    pid = os.fork()
    if pid == 0:
        try:
            _enter(uid, gid)
            os._exit(0)
        except OSError as exc:
            os._exit(exc.errno or errno.EPERM)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if code != 0:
        why = os.strerror(code) if code > 0 else f"signal {-code}"
        raise IsolationError(f"--isolate: this system does not allow a new network namespace ({why}); it needs "
                             "root or unprivileged user namespaces (sysctl user.max_user_namespaces > 0, "
                             "kernel.unprivileged_userns_clone=1). Run without --isolate (Python-level guard "
                             "only) or as root")


def run_isolated(cmd: list[str]) -> int:
    """Runs `cmd` in a new network namespace and returns its exit code. SIGTERM is passed on; SIGINT
    from a terminal reaches the child directly (same process group), so the parent only waits."""
    check_available()
    uid, gid = os.getuid(), os.getgid()
    print("isolate: running in a new network namespace (only loopback exists)", file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, env={**os.environ, ENV: "1"}, preexec_fn=lambda: _enter(uid, gid))
    # Handlers (not SIG_IGN, which exec would pass on) so the child's own handling decides.
    old = {s: signal.signal(s, lambda signum, _f: proc.send_signal(signum) if signum == signal.SIGTERM else None)
           for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
