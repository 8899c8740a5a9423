"""Shared plumbing every capability stands on: config, SQLite, logs, leases, identity, audit, metrics, notifications, durable file writes. Imports only itself (and dicom_node, workflows)."""
