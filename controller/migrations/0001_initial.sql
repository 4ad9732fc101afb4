-- skymesh controller schema, version 1.
-- Counters: `serial` is the topology generation (bumped by every change that can alter a
-- netmap); `ipam_next` is the IPAM high-water mark (only ever grows: addresses are never reused).
CREATE TABLE counters (
    name  TEXT PRIMARY KEY NOT NULL,
    value INTEGER NOT NULL CHECK (value >= 0)
);
INSERT INTO counters (name, value) VALUES ('serial', 1), ('ipam_next', 0);

-- Settings fixed at first start (overlay prefixes) or tracked across restarts (policy).
CREATE TABLE settings (
    name  TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);

CREATE TABLE admin_tokens (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    token_hash  BLOB NOT NULL UNIQUE CHECK (length(token_hash) = 32),
    scope       TEXT NOT NULL CHECK (scope IN ('admin', 'read_only')),
    created_at  INTEGER NOT NULL,
    revoked_at  INTEGER
);

CREATE TABLE enrollment_keys (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    key_hash      BLOB NOT NULL UNIQUE CHECK (length(key_hash) = 32),
    description   TEXT NOT NULL,
    reusable      INTEGER NOT NULL CHECK (reusable IN (0, 1)),
    max_uses      INTEGER CHECK (max_uses IS NULL OR max_uses > 0),
    uses          INTEGER NOT NULL DEFAULT 0,
    expires_at    INTEGER,
    tags          TEXT NOT NULL,            -- JSON array of strings
    auto_approve  INTEGER NOT NULL CHECK (auto_approve IN (0, 1)),
    node_ttl_secs INTEGER CHECK (node_ttl_secs IS NULL OR node_ttl_secs > 0),
    created_at    INTEGER NOT NULL,
    revoked_at    INTEGER,
    CHECK (max_uses IS NULL OR uses <= max_uses)
);

CREATE TABLE nodes (
    id                 INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: ids never reused
    name               TEXT NOT NULL,
    public_key         TEXT NOT NULL UNIQUE,
    ipv4               TEXT NOT NULL UNIQUE,
    ipv6               TEXT NOT NULL UNIQUE,
    state              TEXT NOT NULL CHECK (state IN ('pending', 'approved', 'revoked')),
    tags               TEXT NOT NULL,       -- JSON array of strings, sorted
    endpoints          TEXT NOT NULL,       -- JSON array of skymesh_proto::Endpoint
    advertised_routes  TEXT NOT NULL,       -- JSON array of CIDRs
    approved_routes    TEXT NOT NULL,       -- JSON array of CIDRs, subset of advertised
    credential_hash    BLOB NOT NULL UNIQUE CHECK (length(credential_hash) = 32),
    enrollment_key_id  INTEGER REFERENCES enrollment_keys (id),
    created_at         INTEGER NOT NULL,
    expires_at         INTEGER
);

-- Every address ever handed out, kept after the node is deleted: a second line of defence
-- (with the high-water mark) against reuse.
CREATE TABLE allocated_addresses (
    ipv4          TEXT NOT NULL UNIQUE,
    ipv6          TEXT NOT NULL UNIQUE,
    node_id       INTEGER NOT NULL,
    allocated_at  INTEGER NOT NULL
);

-- Hash-chained audit log (see controller/src/audit.rs).
CREATE TABLE audit_log (
    seq        INTEGER PRIMARY KEY,
    at         INTEGER NOT NULL,
    actor      TEXT NOT NULL,
    action     TEXT NOT NULL,
    target     TEXT,
    detail     TEXT NOT NULL,
    prev_hash  TEXT NOT NULL,
    hash       TEXT NOT NULL UNIQUE
);
