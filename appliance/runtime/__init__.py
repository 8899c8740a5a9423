"""The processes: supervisor, worker and its sweep registry, the dicom/web/media service entry points."""
