"""Whether a process of this host still exists: heartbeats, per-process metric files and
row leases all name a pid, and each asks the same question the same way."""

from __future__ import annotations

import os


def alive(pid: int | None) -> bool:
    """True while ``pid`` names a live process here (one of another user's counts too).

    Signal 0 checks existence without touching the process.  No pid, or one that is
    not positive (a process group, not a process), is not a live process.
    """
    if not pid or pid < 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
