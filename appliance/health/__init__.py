"""Readiness, health series, the status page and report, /livez /readyz /metrics."""
