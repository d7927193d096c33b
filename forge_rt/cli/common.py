"""The one wrapper every command line uses: the offline guard around the work, a domain error as one
`error:` line with exit status 2 (a missing optional extra included: it names the pip extra), and
Ctrl-C as exit 130. Anything else is a bug and keeps its traceback."""
from __future__ import annotations

import contextlib
import sys
from typing import Callable

from forge_rt.core.errors import ForgeError


@contextlib.contextmanager
def offline_guard(allow=()):
    """forge_rt.sovereign.offline(): blocks egress (but to loopback and the `allow` hosts) and puts the hub
    libraries in offline mode."""
    from forge_rt.sovereign import offline
    with offline(allow) as guard:
        yield guard


def say_error(exc: ForgeError, suffix: str = "") -> None:
    """Prints the one `error:` line (unless it was said where it was found: `exc.reported`)."""
    if not exc.reported:
        print(f"error: {exc}{suffix}", file=sys.stderr)
    elif suffix:
        print(suffix.lstrip("; "), file=sys.stderr)


def run_command(body: Callable[[], int | None], offline: bool = True) -> int:
    """Runs a command's body (after its arguments are parsed) and turns its outcome into an exit status."""
    try:
        if not offline:
            return body() or 0
        with offline_guard():
            return body() or 0
    except ForgeError as exc:
        say_error(exc)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
