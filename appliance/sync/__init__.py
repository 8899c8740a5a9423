"""Cloud sync: outbox, bundle format, upload targets (S3, folder), restore, CLI."""
