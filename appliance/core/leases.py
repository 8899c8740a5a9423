"""Who holds a lease on a durable row, and whether that holder is still alive.

Background work here (sync uploads, consult media jobs) is claimed by writing
an owner and an expiry into the row itself.  The owner names the host and the
process, so a lease left by a process killed with -9 on this host can be taken
at once instead of waiting for it to expire.
"""

from __future__ import annotations

import os
import socket
import uuid

from appliance.core import processes


def new_owner() -> str:
    """``host:pid:random``: unique per claimer, and says which process holds it."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def holder_gone(owner: str | None) -> bool:
    """A lease held by a process of this host that no longer exists can be taken at once.

    A holder on another host (a restored or shared database) is never judged
    gone: its lease runs out by time.
    """
    if not owner:
        return True
    host, _, rest = owner.partition(":")
    if host != socket.gethostname():
        return False
    try:
        pid = int(rest.split(":", 1)[0])
    except ValueError:
        return False  # not an owner we wrote: let it run out by time
    return not processes.alive(pid)
