"""DIMSE: the DICOM application entity, its handlers, the study store and its index.

Knows nothing of the appliance: callers hand it settings, paths and hooks.
"""
