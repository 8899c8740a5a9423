"""Tables of migration 19: the registration desk (patients, orders), the temporary-identity
sequence, orders met by studies, and identity reconciliations.

``patient_sequences`` holds the last number handed out per prefix and is only ever counted
up, so a temporary identity (``CAMPN-T0007``) is never issued twice, even after the patient
it named was merged away. A trigger refuses to count it down.
"""

SCHEMA = """
CREATE TABLE patients (
    id INTEGER PRIMARY KEY,
    patient_id TEXT NOT NULL UNIQUE,
    issuer TEXT NOT NULL DEFAULT '',
    name TEXT NOT NULL,
    birth_date TEXT NOT NULL DEFAULT '',
    age TEXT NOT NULL DEFAULT '',
    age_band TEXT NOT NULL DEFAULT '',
    sex TEXT NOT NULL DEFAULT '' CHECK (sex IN ('', 'M', 'F', 'O')),
    temporary INTEGER NOT NULL DEFAULT 0,
    merged_into INTEGER REFERENCES patients(id),
    created_at REAL NOT NULL,
    created_by TEXT NOT NULL
);
CREATE INDEX patients_name ON patients(name);
CREATE TABLE patient_sequences (
    prefix TEXT PRIMARY KEY,
    last INTEGER NOT NULL
);
CREATE TRIGGER patient_sequences_only_up BEFORE UPDATE ON patient_sequences
WHEN NEW.last <= OLD.last
BEGIN SELECT RAISE(ABORT, 'a temporary-identity sequence never goes back'); END;
CREATE TABLE orders (
    id INTEGER PRIMARY KEY,
    patient_ref INTEGER NOT NULL REFERENCES patients(id),
    accession TEXT NOT NULL UNIQUE,
    study_uid TEXT NOT NULL UNIQUE,
    sps_id TEXT NOT NULL,
    procedure_code TEXT NOT NULL,
    procedure_name TEXT NOT NULL,
    modality TEXT NOT NULL,
    priority TEXT NOT NULL DEFAULT 'ROUTINE'
        CHECK (priority IN ('STAT', 'HIGH', 'ROUTINE', 'MEDIUM', 'LOW')),
    reason TEXT NOT NULL DEFAULT '',
    clinical_details TEXT NOT NULL DEFAULT '',
    station_ae TEXT NOT NULL DEFAULT '',
    scheduled_date TEXT NOT NULL,
    scheduled_time TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'scheduled'
        CHECK (status IN ('scheduled', 'in_progress', 'completed', 'discontinued')),
    mpps_uid TEXT UNIQUE,
    created_at REAL NOT NULL,
    created_by TEXT NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX orders_patient ON orders(patient_ref);
CREATE INDEX orders_scheduled ON orders(status, scheduled_date, scheduled_time);
CREATE TABLE order_studies (
    study_uid TEXT PRIMARY KEY,
    order_id INTEGER REFERENCES orders(id),
    flag TEXT NOT NULL CHECK (flag IN ('linked', 'unordered', 'mismatch')),
    detail TEXT NOT NULL DEFAULT '{}',
    checked_at REAL NOT NULL
);
CREATE INDEX order_studies_order ON order_studies(order_id);
CREATE TABLE patient_links (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('link', 'merge', 'study')),
    from_ref INTEGER REFERENCES patients(id),
    study_uid TEXT,
    to_ref INTEGER NOT NULL REFERENCES patients(id),
    actor TEXT NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '{}',
    at REAL NOT NULL,
    undone_at REAL,
    undone_by TEXT,
    CHECK (from_ref != to_ref)
);
CREATE UNIQUE INDEX patient_links_live ON patient_links(from_ref)
    WHERE undone_at IS NULL AND from_ref IS NOT NULL;
"""

# Migration 24: copies a destination still holds under the identity a reconciliation
# replaced (appliance/patients/superseded.py).  One row per (destination, SOP Instance, old
# Patient ID): ``waiting`` until the corrected copy is proved delivered there, then
# ``removed`` (deleted through the destination's Orthanc REST API, or seen gone by C-FIND),
# ``absent`` (the destination held no copy under the old ID: it replaced it itself),
# ``manual`` (no REST API: listed for the PACS administrator, re-checked by C-FIND), or
# ``obsolete`` (a later correction made the old identity the current one again).
# ``pacs_ref`` names the copies found before a DELETE was sent (a kill after the DELETE
# still ends ``removed``, audited); ``lease_owner``/``lease_until`` hold a row while worked on.
SUPERSEDED = """
CREATE TABLE superseded_copies (
    id INTEGER PRIMARY KEY,
    destination TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('image', 'report')),
    old_patient_id TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    sop_uid TEXT NOT NULL,
    link_id INTEGER REFERENCES patient_links(id),
    state TEXT NOT NULL DEFAULT 'waiting'
        CHECK (state IN ('waiting', 'manual', 'removed', 'absent', 'obsolete')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_check_at REAL NOT NULL,
    lease_owner TEXT,
    lease_until REAL,
    pacs_ref TEXT NOT NULL DEFAULT '',
    proof TEXT NOT NULL DEFAULT '',
    last_error TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    done_at REAL,
    UNIQUE (destination, sop_uid, old_patient_id)
);
CREATE INDEX superseded_copies_due ON superseded_copies(state, next_check_at);
CREATE INDEX superseded_copies_sop ON superseded_copies(sop_uid);
"""
