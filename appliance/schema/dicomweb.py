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
