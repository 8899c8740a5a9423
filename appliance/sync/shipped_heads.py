"""The audit chain heads that audit slices carried off the box, read back from a target.

``appliance audit verify --against TARGET`` compares the local chain with the
newest of these: a box whose database and local heads file were both rewritten
is still caught by what it shipped before.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from appliance.sync import bundle as bnd
from appliance.sync import targets as st


def shipped_heads(target: st.Target, identities: list, trusted: list[str],
                  site_id: str) -> list[dict[str, Any]]:
    """Every signed head in the site's audit-slice bundles on ``target``, oldest first.

    Each bundle is verified against ``trusted`` and decrypted to a temporary
    directory that is removed afterwards."""
    heads: list[dict[str, Any]] = []
    work = Path(tempfile.mkdtemp(prefix="audit-heads-"))
    try:
        for o in target.list(f"{site_id}/"):
            if "-audit-" not in o.key.rsplit("/", 1)[-1]:
                continue
            local = work / "slice.bundle"
            target.download(o.key, local)
            opened = bnd.open_to_staging(local, identities, work / "staging", None, trusted)
            for fe in opened.manifest["files"]:
                if fe.get("type") == "audit_heads":
                    heads += json.loads((opened.root / fe["name"]).read_text())
            shutil.rmtree(opened.root, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return sorted(heads, key=lambda h: h.get("id", 0))
