"""The read queue, the worklist every reader works from, turnaround, its pages, JSON API and workflow CLI."""
