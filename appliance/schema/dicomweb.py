"""Tables of DICOMweb (migration 8): the metadata kept per instance after ingest."""

METADATA = """
        CREATE TABLE dicomweb_metadata (
            sop_uid TEXT PRIMARY KEY,
            series_uid TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            json TEXT NOT NULL,
            pixel TEXT NOT NULL DEFAULT '',
            made_at REAL NOT NULL
        );
        CREATE INDEX dicomweb_metadata_series ON dicomweb_metadata(series_uid);
        """

# Migration 22: which instance versions have their frames in the HTJ2K cache
# (DATA_DIR/htj2k/<study>/…); a row per instance version, so a replaced instance
# (new sha256) is encoded again and a restored box (no rows) rebuilds its cache.
HTJ2K_CACHE = """
        CREATE TABLE htj2k_cache (
            sop_uid TEXT PRIMARY KEY,
            study_uid TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            frames INTEGER NOT NULL,
            bytes INTEGER NOT NULL,
            error TEXT NOT NULL DEFAULT '',
            made_at REAL NOT NULL
        );
        CREATE INDEX htj2k_cache_study ON htj2k_cache(study_uid);
        """
