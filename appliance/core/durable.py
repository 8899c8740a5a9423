"""Durable file writes for every capability: temp file, fsync, rename, fsync of the directory.

One implementation serves the whole box: the DICOM node's (``dicom_node.durable``),
which must not import ``appliance`` and so cannot live here. Capabilities import this
module, never ``dicom_node.durable`` directly, so the appliance's file-write discipline
has one name and one place to change.
"""

from __future__ import annotations

from dicom_node.durable import (
    TMP_SUFFIX,
    atomic_write,
    discard,
    ensure_dir,
    free_mb,
    fsync_dir,
    move_into_place,
    remove_temp_files,
    write_temp,
)

__all__ = ["TMP_SUFFIX", "atomic_write", "discard", "ensure_dir", "free_mb", "fsync_dir", "move_into_place",
           "remove_temp_files", "write_temp"]
