"""Tables of health over time (migration 10): samples, SLO observations, component starts."""

SERIES = """
CREATE TABLE health_samples (
    name TEXT NOT NULL,
    minute REAL NOT NULL,
    value REAL NOT NULL,
    PRIMARY KEY (name, minute)
) WITHOUT ROWID;
CREATE INDEX health_samples_minute ON health_samples(minute);

-- One row per observation an SLO is measured on: a sign-in, a consult join, a call,
-- a read. good = 1 when it met its objective.
CREATE TABLE slo_observations (
    id INTEGER PRIMARY KEY,
    slo TEXT NOT NULL,
    ts REAL NOT NULL,
    value REAL NOT NULL,
    good INTEGER NOT NULL CHECK (good IN (0, 1))
);
CREATE INDEX slo_observations_slo_ts ON slo_observations(slo, ts);

-- Each (re)start of a component, seen from its heartbeat row.
CREATE TABLE component_starts (
    component TEXT NOT NULL,
    started_at REAL NOT NULL,
    pid INTEGER,
    PRIMARY KEY (component, started_at)
) WITHOUT ROWID;
"""
