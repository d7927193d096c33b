"""The root of forge_rt's errors. Every domain error (bad data, bad config, a corrupt checkpoint or
sealed file, a model that cannot be loaded, ...) derives from `ForgeError`, so a command line catches
one type and prints one `error:` line; anything else is a bug and keeps its traceback."""
from __future__ import annotations


class ForgeError(Exception):
    """A problem the user can fix; its message names the thing and the fix."""
