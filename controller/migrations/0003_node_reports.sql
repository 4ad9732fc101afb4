-- What nodes report about themselves (issue 4): when they were last heard from, the source
-- address the controller saw, and their latest status report (JSON skymesh_proto::StatusReport).
-- Not part of the topology: writing here never bumps the serial.
CREATE TABLE node_status (
    node_id      INTEGER PRIMARY KEY NOT NULL,
    last_seen    INTEGER NOT NULL,
    seen_from    TEXT,
    reported_at  INTEGER,
    report       TEXT
);
