"""The root of forge_rt's errors. Every domain error (bad data, bad config, a corrupt checkpoint or
sealed file, a model that cannot be loaded, ...) derives from `ForgeError`, so a command line catches
one type and prints one `error:` line; anything else is a bug and keeps its traceback."""
from __future__ import annotations


class ForgeError(Exception):
    """A problem the user can fix; its message names the thing and the fix. `reported`: already printed
    where it was found (a command line then prints only what it adds)."""
    reported = False


class MissingExtra(ForgeError, ImportError):
    """An optional dependency of one feature is not installed; the message names the pip extra."""


def require_extra(extra: str, feature: str):
    """Context manager for a module's optional imports: an ImportError becomes a MissingExtra that says
    which `pip install 'forge_rt[extra]'` brings it."""
    return _RequireExtra(extra, feature)


class _RequireExtra:
    def __init__(self, extra: str, feature: str):
        self.extra, self.feature = extra, feature

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and issubclass(exc_type, ImportError) and not issubclass(exc_type, MissingExtra):
            package = (exc.name or "?").split(".")[0]
            raise MissingExtra(f"{self.feature} needs the package {package!r}, which is not installed: "
                               f"pip install 'forge_rt[{self.extra}]'") from exc
        return False
