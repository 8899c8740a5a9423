"""The field teleradiology appliance: configuration, data, CLI and the processes that serve it."""

__version__ = "0.1.0"
