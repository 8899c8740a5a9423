"""Tables of the read queue (migration 5): read items, their history, escalation steps,
pending completions, loaded workflow versions; the notification inbox, which core owns
(``core/notifications.py``), was created by the same migration and is in ``core.py``.

Kept apart from the modules that use them so that ``appliance.db`` can import
the DDL without importing the worklist (which itself needs ``appliance.db``).
"""

from appliance.schema import core

SCHEMA = """
CREATE TABLE read_items (
    id INTEGER PRIMARY KEY,
    study_uid TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL DEFAULT 'queued' CHECK (state IN
        ('queued', 'claimed', 'preliminary', 'final', 'delivered', 'cancelled')),
    priority TEXT NOT NULL,
    priority_rank INTEGER NOT NULL,
    sla_minutes REAL NOT NULL,
    first_received REAL NOT NULL,
    due_at REAL NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    pool TEXT NOT NULL,
    pool_roles TEXT NOT NULL,
    pool_tags TEXT NOT NULL DEFAULT '',
    workflow TEXT NOT NULL DEFAULT '',
    rule TEXT NOT NULL DEFAULT '',
    workflow_sha TEXT NOT NULL DEFAULT '',
    actions TEXT NOT NULL DEFAULT '[]',
    hold INTEGER NOT NULL DEFAULT 0,
    modalities TEXT NOT NULL DEFAULT '',
    instances_seen INTEGER NOT NULL DEFAULT 0,
    late_instances INTEGER NOT NULL DEFAULT 0,
    late_at REAL,
    breached INTEGER NOT NULL DEFAULT 0,
    breached_at REAL,
    claimed_by TEXT,
    claimed_at REAL,
    claim_expires_at REAL,
    read_at REAL,
    final_at REAL
);
CREATE INDEX read_items_due ON read_items(due_at);
CREATE INDEX read_items_state_due ON read_items(state, due_at);
CREATE INDEX read_items_claims ON read_items(claim_expires_at) WHERE state = 'claimed';
CREATE INDEX read_items_read_at ON read_items(read_at) WHERE read_at IS NOT NULL;

CREATE TABLE read_item_history (
    id INTEGER PRIMARY KEY,
    item_id INTEGER NOT NULL REFERENCES read_items(id),
    ts REAL NOT NULL,
    actor TEXT NOT NULL,
    event TEXT NOT NULL,
    from_state TEXT,
    to_state TEXT,
    detail TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX read_item_history_item ON read_item_history(item_id, id);

-- Each rung of an item's escalation ladder, timed when the item is created.
-- fired_at is set in the same transaction as the step's notifications, so a
-- step fires exactly once; skipped_at when the item was read before it was due.
CREATE TABLE escalation_steps (
    id INTEGER PRIMARY KEY,
    item_id INTEGER NOT NULL REFERENCES read_items(id),
    step_index INTEGER NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL DEFAULT '{}',
    description TEXT NOT NULL DEFAULT '',
    fire_at REAL NOT NULL,
    fired_at REAL,
    skipped_at REAL,
    UNIQUE (item_id, step_index)
);
CREATE INDEX escalation_steps_due ON escalation_steps(fire_at)
    WHERE fired_at IS NULL AND skipped_at IS NULL;

-- Studies that received an instance since the sweep last looked at them.
-- Filled by triggers on the index, in the study store's own transaction, so
-- a completion cannot be lost between the C-STORE and the worker.
CREATE TABLE pending_completions (
    study_uid TEXT PRIMARY KEY,
    touched_at REAL NOT NULL
);
CREATE TRIGGER pending_on_new_study AFTER INSERT ON studies
BEGIN
    INSERT INTO pending_completions (study_uid, touched_at) VALUES (NEW.study_uid, NEW.last_received)
    ON CONFLICT(study_uid) DO UPDATE SET touched_at = excluded.touched_at;
END;
CREATE TRIGGER pending_on_study_update AFTER UPDATE OF last_received, num_instances ON studies
BEGIN
    INSERT INTO pending_completions (study_uid, touched_at) VALUES (NEW.study_uid, NEW.last_received)
    ON CONFLICT(study_uid) DO UPDATE SET touched_at = excluded.touched_at;
END;
INSERT INTO pending_completions (study_uid, touched_at)
    SELECT study_uid, last_received FROM studies;

-- Workflow files as loaded: the text of every good version (so a worker that
-- restarts on a broken file still has the last good one) and what is in force.
CREATE TABLE workflow_versions (
    id INTEGER PRIMARY KEY,
    filename TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    content TEXT NOT NULL,
    loaded_at REAL NOT NULL,
    UNIQUE (filename, sha256)
);
CREATE TABLE workflow_files (
    filename TEXT PRIMARY KEY,
    active_sha TEXT,
    active_since REAL,
    last_error TEXT,
    last_error_at REAL,
    checked_at REAL NOT NULL
);

""" + core.NOTIFICATIONS

# Migration 20: a read item may exist while its study is still arriving (a STAT study is
# listed within seconds of its first image): ``arriving`` is 1 until the study has been
# quiet for ``worker.quiet_period_s`` (``completed_at``), the moment that runs what needs
# the whole study. Items made before this migration, or written by anything that does not
# know, are complete. The partial index serves the worklist's paged query (open states,
# soonest due first).
ARRIVING = """
ALTER TABLE read_items ADD COLUMN arriving INTEGER NOT NULL DEFAULT 0;
ALTER TABLE read_items ADD COLUMN completed_at REAL;
UPDATE read_items SET completed_at = created_at;
CREATE INDEX read_items_open_due ON read_items(due_at, id)
    WHERE state IN ('queued', 'claimed', 'preliminary');

-- The worklist's version: bumped, in the writer's own transaction, by any change to what a
-- worklist row shows (the read item, its study's patient and image count, its series' body
-- parts). A refresh whose ETag (appliance/reading/freshness.py) carries the same version
-- answers 304 without running the page's query.
CREATE TABLE worklist_version (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL
);
INSERT INTO worklist_version (id, version) VALUES (1, 0);
CREATE TRIGGER worklist_version_read_items_insert AFTER INSERT ON read_items
BEGIN
    UPDATE worklist_version SET version = version + 1 WHERE id = 1;
END;
CREATE TRIGGER worklist_version_read_items_update AFTER UPDATE ON read_items
BEGIN
    UPDATE worklist_version SET version = version + 1 WHERE id = 1;
END;
CREATE TRIGGER worklist_version_read_items_delete AFTER DELETE ON read_items
BEGIN
    UPDATE worklist_version SET version = version + 1 WHERE id = 1;
END;
CREATE TRIGGER worklist_version_studies_insert AFTER INSERT ON studies
BEGIN
    UPDATE worklist_version SET version = version + 1 WHERE id = 1;
END;
CREATE TRIGGER worklist_version_studies_update AFTER UPDATE ON studies
BEGIN
    UPDATE worklist_version SET version = version + 1 WHERE id = 1;
END;
CREATE TRIGGER worklist_version_studies_delete AFTER DELETE ON studies
BEGIN
    UPDATE worklist_version SET version = version + 1 WHERE id = 1;
END;
CREATE TRIGGER worklist_version_series_insert AFTER INSERT ON series
BEGIN
    UPDATE worklist_version SET version = version + 1 WHERE id = 1;
END;
CREATE TRIGGER worklist_version_series_update AFTER UPDATE ON series
BEGIN
    UPDATE worklist_version SET version = version + 1 WHERE id = 1;
END;
CREATE TRIGGER worklist_version_series_delete AFTER DELETE ON series
BEGIN
    UPDATE worklist_version SET version = version + 1 WHERE id = 1;
END;
"""
