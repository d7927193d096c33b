"""The one domain error of forge_rt.privacy."""
from forge_rt.core.errors import ForgeError


class DPError(ForgeError, ValueError):
    """A differentially private training setup that cannot keep its guarantee; the message says the fix."""
