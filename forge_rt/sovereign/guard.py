"""No egress: block outbound network connections from this process.

    with sovereign.offline() as guard:      # or: guard = sovereign.install() for the whole process
        train(...)
    guard.report()   # {"egress_attempted": False, "attempts": []}

Loopback (127.0.0.0/8, ::1, "localhost") and Unix sockets stay allowed, and so do the hosts named in
`offline(allow=...)` (the trainer names torchrun's rendezvous address, MASTER_ADDR). Every blocked
attempt raises `EgressBlocked` (a ConnectionRefusedError, so libraries that handle refused connections fail cleanly
instead of crashing), is logged with its stack trace, and recorded for the run report. Hub libraries
are switched to offline mode through their environment variables.

This guards Python-level sockets. Native code that opens sockets itself (a C library calling
connect(2) directly) bypasses it; `forge_rt.sovereign.isolate` (train --isolate) runs in a network
namespace for that.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import socket
import threading
import traceback
from dataclasses import dataclass, field

from forge_rt.core.errors import ForgeError

log = logging.getLogger("forge_rt.sovereign")

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1", "WANDB_MODE": "offline"}
_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback", ""}


def set_offline_env() -> None:
    """Puts the hub libraries (transformers, huggingface_hub, datasets, wandb) in offline mode."""
    os.environ.update(OFFLINE_ENV)


class EgressBlocked(ForgeError, ConnectionRefusedError):
    """An outbound connection was blocked by forge_rt.sovereign.offline()."""


def _host(host) -> str:
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    return str(host).split("%", 1)[0].strip("[]").lower()


def _ip(host: str):
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _is_local_host(host) -> bool:
    """Loopback literal or a local name. Any other name is not local: even resolving it leaks via DNS."""
    if host is None:
        return True
    h = _host(host)
    return h in _LOCAL_NAMES or (_ip(h) is not None and _ip(h).is_loopback)


def _needs_dns(host) -> bool:
    """A lookup that would query DNS (a leak by itself); IP literals and local names resolve locally."""
    return not _is_local_host(host) and _ip(_host(host)) is None


# Families that never leave the machine: Unix sockets and the kernel's netlink.
_LOCAL_FAMILIES = {getattr(socket, n) for n in ("AF_UNIX", "AF_NETLINK") if hasattr(socket, n)}


def _is_local_address(family, address) -> bool:
    """family None means "decide from the address" (create_connection, which only does IP)."""
    if family in _LOCAL_FAMILIES:
        return True
    if family not in (None, socket.AF_INET, socket.AF_INET6):
        return False   # packet, CAN, Bluetooth...: could leave the machine
    return isinstance(address, tuple) and bool(address) and _is_local_host(address[0])


# What the guard wraps: (owner, attribute, where the target is in the call's arguments, allowed?).
# Socket methods get the socket first; sendto's address is its last argument.
_SOCK_ADDR = (lambda a: a[1], lambda a, t: _is_local_address(a[0].family, t))
_HOST = (lambda a: a[0], lambda a, t: not _needs_dns(t))
_GUARDED = (
    (socket.socket, "connect", *_SOCK_ADDR),
    (socket.socket, "connect_ex", *_SOCK_ADDR),
    (socket.socket, "sendto", lambda a: a[-1], lambda a, t: _is_local_address(a[0].family, t)),
    (socket, "create_connection", lambda a: a[0], lambda a, t: _is_local_address(None, t)),
    (socket, "getaddrinfo", *_HOST),
    (socket, "gethostbyname", *_HOST),
    (socket, "gethostbyname_ex", *_HOST),
)


@dataclass
class Attempt:
    what: str       # "connect", "create_connection", "getaddrinfo", ...
    target: str
    stack: str


@dataclass
class Guard:
    attempts: list[Attempt] = field(default_factory=list)
    active: bool = False
    allow: frozenset = frozenset()   # hosts let through besides loopback (normalised by _host)
    _saved: dict = field(default_factory=dict, repr=False)
    _env_saved: dict = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _block(self, what: str, target) -> EgressBlocked:
        stack = "".join(traceback.format_stack()[:-2])
        with self._lock:
            self.attempts.append(Attempt(what, repr(target), stack))
        log.warning("forge_rt offline guard blocked %s to %r\n%s", what, target, stack)
        return EgressBlocked(f"forge_rt offline mode: outbound {what} to {target!r} blocked "
                             f"(only {self.allowed()} are allowed)")

    def allowed(self) -> str:
        """What gets through, in words (for errors and the run report)."""
        if not self.allow:
            return "loopback and Unix sockets"
        return f"loopback, Unix sockets and {', '.join(sorted(self.allow))}"

    def _let_through(self, target) -> bool:
        host = target[0] if isinstance(target, tuple) and target else target
        return isinstance(host, (str, bytes)) and _host(host) in self.allow

    def install(self) -> "Guard":
        if self.active:
            return self
        self._saved = {}
        for owner, name, target_of, allowed in _GUARDED:
            orig = getattr(owner, name)
            self._saved[(owner, name)] = orig
            setattr(owner, name, self._wrap(name, orig, target_of, allowed))
        self._env_saved = {k: os.environ.get(k) for k in OFFLINE_ENV}
        os.environ.update(OFFLINE_ENV)
        self.active = True
        return self

    def _wrap(self, name: str, orig, target_of, allowed):
        guard = self

        def guarded(*args, **kwargs):
            target = target_of(args)
            if not allowed(args, target) and not guard._let_through(target):
                raise guard._block(name, target)
            return orig(*args, **kwargs)
        guarded.__name__ = guarded.__qualname__ = name
        return guarded

    def uninstall(self) -> None:
        if not self.active:
            return
        for (owner, name), orig in self._saved.items():
            setattr(owner, name, orig)
        for k, v in self._env_saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self.active = False

    def __enter__(self) -> "Guard":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def report(self) -> dict:
        """For the run report: whether any egress was attempted, and where from."""
        return {"egress_attempted": bool(self.attempts),
                "summary": "no egress attempted" if not self.attempts else f"{len(self.attempts)} egress attempt(s) blocked",
                "attempts": [{"what": a.what, "target": a.target, "stack": a.stack} for a in self.attempts]}


_process_guard: Guard | None = None


def offline(allow=()) -> Guard:
    """A guard to use as a context manager: `with offline() as g: ...` (restores everything on exit).
    `allow`: host names or addresses let through besides loopback (e.g. a rendezvous address)."""
    return Guard(allow=frozenset(_host(h) for h in allow if not _is_local_host(h)))


def install() -> Guard:
    """Block egress for the rest of the process; returns the process-wide guard (idempotent)."""
    global _process_guard
    if _process_guard is None:
        _process_guard = Guard()
    return _process_guard.install()


__all__ = ["offline", "install", "Guard", "EgressBlocked", "OFFLINE_ENV"]
