"""Patients: the registration desk, trauma identities, orders (worklist, MPPS), orders met by
studies and identity reconciliation, for when the hospital's own systems are down."""
