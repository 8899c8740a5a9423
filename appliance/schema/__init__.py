"""The numbered migrations, in one place: SQL text only, imported only by the migrator
(``appliance/core/db.py``).

Each capability's tables are SQL text in a module here named for it (``reading.py`` for
the read queue, ``sync.py`` for the outbox …), so migrating imports no domain code.
"""

from __future__ import annotations

from appliance.schema import (
    accounts,
    consults,
    core,
    dicomweb,
    forwarding,
    health,
    notify,
    patients,
    reading,
    reports,
    sync,
)
from dicom_node import index as dicom_index

# (number, description, SQL). Append only; never edit a landed migration (descriptions
# included: they are stored in the ledger, so older ones name modules by their old paths).
# Numbers reserved per area: 5 read queue (workflows), 6 auth (sessions, tokens),
# 7 sync outbox, 8 DICOMweb metadata, 9 reports, 10 health time series.
# dicom_node owns its index tables (dicom_node/index.py) but they are migrated here,
# so one place decides the order of every schema change.
MIGRATIONS: list[tuple[int, str, str]] = [
    (1, "DICOM index: studies, series, instances", dicom_index.SCHEMA_V1),
    (
        2,
        "components heartbeat and key/value settings",
        core.COMPONENTS_SETTINGS,
    ),
    (3, "hash-chained audit trail", core.AUDIT),
    (4, "user accounts", accounts.USERS),
    (5, "read queue: read items, history, escalation steps, pending completions, workflow"
        " versions, notification inbox", reading.SCHEMA),
    (6, "auth: sessions, login attempts, API tokens, break-glass", accounts.AUTH),
    (7, "sync: bundle outbox, items, upload parts, sequence, received ledger",
     sync.SCHEMA),
    (
        8,
        "DICOMweb metadata cache (appliance/dicomweb_metadata.py)",
        dicomweb.METADATA,
    ),
    (9, "reports, signed versions, critical findings, delivery outbox", reports.SCHEMA),
    (10, "health time series: samples, SLO observations, component starts",
     health.SERIES),
    (
        12,
        "consults: rooms, invites, participants, signaling/chat/ladder events, call stats"
        " (appliance/consults.py)",
        consults.ROOMS,
    ),
    (
        15,
        "consult media: work for `appliance media serve` (recordings, probes, relays), sealed"
        " recordings; bundles may carry kind 'recording' (outbox tables rebuilt for the wider"
        " CHECK)",
        consults.MEDIA + sync.RECORDING_KIND,
    ),
    (16, "consult participants removed by a host (removed_at, removed_by)", consults.REMOVALS),
    (17, "forwarding outbox: instances to site PACS destinations, leases, commitment",
     forwarding.SCHEMA),
    (18, "notify: contact points, messages, delivery outbox, ack pages, health alerts",
     notify.SCHEMA),
    (19, "patients: registrations, temporary-identity sequence, orders (worklist, MPPS),"
         " orders met by studies, identity links", patients.SCHEMA),
    (20, "read items while a study arrives (completed_at), worklist paging indexes",
     reading.ARRIVING),
    (22, "HTJ2K frame cache: instance versions encoded (appliance/dicomweb/htj2k_cache.py)",
     dicomweb.HTJ2K_CACHE),
    (23, "hand-back progress: per run, instances/bytes/report documents planned and sent,"
         " state, owner process (appliance/forwarding/progress.py)",
     forwarding.HANDBACK_PROGRESS),
    (24, "patients: copies superseded by a reconciliation at forwarding destinations, until"
         " removed (appliance/patients/superseded.py)", patients.SUPERSEDED),
    (25, "reports: a final report superseded by an identity correction addendum (who, when,"
         " which link; appliance/reports/corrections.py)", reports.SUPERSESSIONS),
]
