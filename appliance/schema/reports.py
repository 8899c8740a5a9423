"""Tables of migration 9: reports, signed versions, critical findings, the delivery outbox.

Kept apart from :mod:`appliance.reports` so that :mod:`appliance.db` can
import the DDL without importing the report model (which uses ``db``).

Locks are enforced by SQLite itself, not only by the Python code, so that no
later code path (or a hand-typed ``UPDATE``) can change what a reader signed:

- a ``final`` report row can no longer be updated at all (an addendum is a
  new row linked by ``parent_id``);
- ``report_versions`` (one row per signature: the exact text, who, when and
  its SHA-256) are append-only, and ``UNIQUE(report_id, level)`` refuses a
  second signature of the same level;
- a critical finding's acknowledgement, once recorded, cannot be changed.
"""

SCHEMA = """
CREATE TABLE reports (
    id INTEGER PRIMARY KEY,
    study_uid TEXT NOT NULL,
    read_item_id INTEGER,
    kind TEXT NOT NULL DEFAULT 'report' CHECK (kind IN ('report', 'addendum')),
    parent_id INTEGER REFERENCES reports(id),
    template_id TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'draft' CHECK (status IN ('draft', 'preliminary', 'final')),
    fields TEXT NOT NULL DEFAULT '{}',
    findings TEXT NOT NULL DEFAULT '',
    impression TEXT NOT NULL DEFAULT '',
    revision INTEGER NOT NULL DEFAULT 0,
    author TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE UNIQUE INDEX reports_one_per_item ON reports(read_item_id)
    WHERE kind = 'report' AND read_item_id IS NOT NULL;
CREATE INDEX reports_study ON reports(study_uid);
CREATE INDEX reports_parent ON reports(parent_id);
CREATE TRIGGER reports_final_locked BEFORE UPDATE ON reports WHEN OLD.status = 'final'
BEGIN SELECT RAISE(ABORT, 'a final report is locked; add an addendum'); END;
CREATE TRIGGER reports_signed_kept BEFORE DELETE ON reports WHEN OLD.status != 'draft'
BEGIN SELECT RAISE(ABORT, 'a signed report cannot be deleted'); END;

CREATE TABLE report_versions (
    id INTEGER PRIMARY KEY,
    report_id INTEGER NOT NULL REFERENCES reports(id),
    level TEXT NOT NULL CHECK (level IN ('preliminary', 'final')),
    template_id TEXT NOT NULL,
    fields TEXT NOT NULL,
    findings TEXT NOT NULL,
    impression TEXT NOT NULL,
    text TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    signed_by TEXT NOT NULL,
    signer_name TEXT NOT NULL,
    signed_at REAL NOT NULL,
    UNIQUE (report_id, level)
);
CREATE TRIGGER report_versions_no_update BEFORE UPDATE ON report_versions
BEGIN SELECT RAISE(ABORT, 'signed report versions are append-only'); END;
CREATE TRIGGER report_versions_no_delete BEFORE DELETE ON report_versions
BEGIN SELECT RAISE(ABORT, 'signed report versions are append-only'); END;

CREATE TABLE critical_findings (
    id INTEGER PRIMARY KEY,
    report_id INTEGER NOT NULL REFERENCES reports(id),
    study_uid TEXT NOT NULL,
    read_item_id INTEGER,
    description TEXT NOT NULL,
    flagged_by TEXT NOT NULL,
    flagged_at REAL NOT NULL,
    acknowledged_by TEXT,
    acknowledged_at REAL,
    ack_note TEXT NOT NULL DEFAULT '',
    escalation_level INTEGER NOT NULL DEFAULT 0,
    next_escalation_at REAL NOT NULL,
    last_escalated_at REAL
);
CREATE INDEX critical_open ON critical_findings(acknowledged_at, next_escalation_at);
CREATE TRIGGER critical_ack_final BEFORE UPDATE ON critical_findings
WHEN OLD.acknowledged_at IS NOT NULL AND (NEW.acknowledged_at IS NOT OLD.acknowledged_at
    OR NEW.acknowledged_by IS NOT OLD.acknowledged_by OR NEW.ack_note IS NOT OLD.ack_note)
BEGIN SELECT RAISE(ABORT, 'an acknowledgement cannot be changed'); END;
CREATE TRIGGER critical_no_delete BEFORE DELETE ON critical_findings
BEGIN SELECT RAISE(ABORT, 'critical findings cannot be deleted'); END;

CREATE TABLE deliveries (
    id INTEGER PRIMARY KEY,
    version_id INTEGER NOT NULL REFERENCES report_versions(id),
    report_id INTEGER NOT NULL REFERENCES reports(id),
    read_item_id INTEGER,
    format TEXT NOT NULL,
    destination TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivered')),
    series_uid TEXT NOT NULL,
    sop_uid TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    lease_owner TEXT,
    lease_until REAL,
    last_error TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    delivered_at REAL,
    UNIQUE (version_id, format, destination)
);
CREATE INDEX deliveries_due ON deliveries(state, next_attempt_at);
CREATE INDEX deliveries_item ON deliveries(read_item_id);
"""

# Migration 25: a final report superseded by an identity correction
# (appliance/reports/corrections.py).  The report row is locked (``reports_final_locked``),
# so the mark is a row of its own: which report, which signed correction addendum supersedes
# it, which reconciliation (``patient_links`` row and what was done to it: link, merge,
# unlink, study), who, when, and the identity the study carries since.  An unlink marks the
# original again and the link's addendum too: the newest correction of an original wins.
# Append-only, like the signatures: a mark is history.
SUPERSESSIONS = """
CREATE TABLE report_supersessions (
    id INTEGER PRIMARY KEY,
    report_id INTEGER NOT NULL REFERENCES reports(id),
    addendum_id INTEGER NOT NULL REFERENCES reports(id),
    link_id INTEGER NOT NULL REFERENCES patient_links(id),
    action TEXT NOT NULL CHECK (action IN ('link', 'merge', 'unlink', 'study')),
    patient_id TEXT NOT NULL,
    patient_name TEXT NOT NULL,
    actor TEXT NOT NULL,
    at REAL NOT NULL,
    CHECK (report_id != addendum_id),
    UNIQUE (report_id, addendum_id)
);
CREATE INDEX report_supersessions_report ON report_supersessions(report_id, id);
CREATE INDEX report_supersessions_link ON report_supersessions(link_id);
CREATE TRIGGER report_supersessions_no_update BEFORE UPDATE ON report_supersessions
BEGIN SELECT RAISE(ABORT, 'report supersessions are append-only'); END;
CREATE TRIGGER report_supersessions_no_delete BEFORE DELETE ON report_supersessions
BEGIN SELECT RAISE(ABORT, 'report supersessions are append-only'); END;
"""
