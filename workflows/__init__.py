"""Routing, SLA and escalation rules written in YAML, and the engine that applies them.

Knows nothing of the appliance: callers hand it study attributes and paths.
"""
