"""Tables of cloud sync (migration 7): the outbox, what each bundle carries, upload parts,
and the ledger of bundles received on restore.

The outbox, not huey, is the durable state: a row is leased by the process
working on it, and a lease that runs out (the worker was killed) is taken over
by the next sweep.
"""

SCHEMA = """
CREATE TABLE bundles (
    bundle_id TEXT PRIMARY KEY,
    site_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('study', 'report', 'audit')),
    subject TEXT NOT NULL DEFAULT '',
    priority INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN
        ('building', 'built', 'uploading', 'uploaded', 'confirmed')),
    path TEXT NOT NULL,
    size INTEGER,
    sha256 TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_until REAL NOT NULL DEFAULT 0,
    bytes_sent INTEGER NOT NULL DEFAULT 0,
    target_key TEXT,
    upload_id TEXT,
    last_error TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    built_at REAL,
    uploaded_at REAL,
    confirmed_at REAL,
    UNIQUE (site_id, seq)
);
CREATE INDEX bundles_due ON bundles(state, priority, seq);

-- What each bundle carries. An instance version (sop_uid + sha256) is in one bundle
-- only; a late or replaced instance goes into a new bundle.
CREATE TABLE bundle_items (
    bundle_id TEXT NOT NULL REFERENCES bundles(bundle_id),
    item_kind TEXT NOT NULL,
    item_id TEXT NOT NULL,
    version TEXT NOT NULL DEFAULT '',
    path TEXT NOT NULL DEFAULT '',
    size INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (item_kind, item_id, version)
);
CREATE INDEX bundle_items_bundle ON bundle_items(bundle_id);

-- Parts the target acknowledged (a local record; ListParts on the target is the truth).
CREATE TABLE bundle_parts (
    bundle_id TEXT NOT NULL REFERENCES bundles(bundle_id),
    part_number INTEGER NOT NULL,
    etag TEXT NOT NULL,
    size INTEGER NOT NULL,
    sent_at REAL NOT NULL,
    PRIMARY KEY (bundle_id, part_number)
);

-- The sequence number of each site's last bundle (monotonic, never reused).
CREATE TABLE bundle_sequence (
    site_id TEXT PRIMARY KEY,
    last_seq INTEGER NOT NULL
);

-- Bundles applied by restore / open: a (site, sequence number) is accepted once.
CREATE TABLE received_bundles (
    bundle_id TEXT PRIMARY KEY,
    site_id TEXT NOT NULL,
    key_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    received_at REAL NOT NULL,
    UNIQUE (site_id, seq)
);
"""

# The second half of migration 15 (the first is ``schema/consults.MEDIA``): the outbox
# tables rebuilt so that a bundle may carry kind 'recording'.
RECORDING_KIND = """        CREATE TABLE bundles_v15 (
            bundle_id TEXT PRIMARY KEY,
            site_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('study', 'report', 'audit', 'recording')),
            subject TEXT NOT NULL DEFAULT '',
            priority INTEGER NOT NULL,
            state TEXT NOT NULL CHECK (state IN
                ('building', 'built', 'uploading', 'uploaded', 'confirmed')),
            path TEXT NOT NULL,
            size INTEGER,
            sha256 TEXT,
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt REAL NOT NULL DEFAULT 0,
            lease_owner TEXT,
            lease_until REAL NOT NULL DEFAULT 0,
            bytes_sent INTEGER NOT NULL DEFAULT 0,
            target_key TEXT,
            upload_id TEXT,
            last_error TEXT NOT NULL DEFAULT '',
            created_at REAL NOT NULL,
            built_at REAL,
            uploaded_at REAL,
            confirmed_at REAL,
            UNIQUE (site_id, seq)
        );
        INSERT INTO bundles_v15 SELECT * FROM bundles;
        CREATE TABLE bundle_items_v15 (
            bundle_id TEXT NOT NULL REFERENCES bundles_v15(bundle_id),
            item_kind TEXT NOT NULL,
            item_id TEXT NOT NULL,
            version TEXT NOT NULL DEFAULT '',
            path TEXT NOT NULL DEFAULT '',
            size INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (item_kind, item_id, version)
        );
        INSERT INTO bundle_items_v15 SELECT * FROM bundle_items;
        CREATE TABLE bundle_parts_v15 (
            bundle_id TEXT NOT NULL REFERENCES bundles_v15(bundle_id),
            part_number INTEGER NOT NULL,
            etag TEXT NOT NULL,
            size INTEGER NOT NULL,
            sent_at REAL NOT NULL,
            PRIMARY KEY (bundle_id, part_number)
        );
        INSERT INTO bundle_parts_v15 SELECT * FROM bundle_parts;
        DROP TABLE bundle_parts;
        DROP TABLE bundle_items;
        DROP TABLE bundles;
        ALTER TABLE bundles_v15 RENAME TO bundles;
        ALTER TABLE bundle_items_v15 RENAME TO bundle_items;
        ALTER TABLE bundle_parts_v15 RENAME TO bundle_parts;
        CREATE INDEX bundles_due ON bundles(state, priority, seq);
        CREATE INDEX bundle_items_bundle ON bundle_items(bundle_id);
        """
