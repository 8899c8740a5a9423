"""Routing, SLA and escalation rules written in YAML, and the engine that applies them.

Knows nothing of the appliance: callers hand it study attributes and paths.
``schema`` validates files (``file:line:column: what is wrong``), ``engine``
matches rules and explains, ``facts`` turns index rows or DICOM headers into
what rules look at, ``library/`` ships commented examples.
"""

from workflows.engine import Decision, StudyFacts, decide
from workflows.schema import Pool, Step, Workflow, WorkflowError, load, parse

__all__ = ["Decision", "Pool", "Step", "StudyFacts", "Workflow", "WorkflowError", "decide",
           "load", "parse"]
