-- skymesh controller schema for PostgreSQL: the same tables and meaning as the SQLite
-- migrations in ../migrations (0001..0003 folded into one), with PostgreSQL types.
-- Counters: `serial` is the topology generation (bumped by every change that can alter a
-- netmap); `ipam_next` is the IPAM high-water mark (only ever grows: addresses are never
-- reused); `expiry_swept_at` is the unix time up to which node expiries were folded into the
-- serial. Replicas serialise on these rows (see src/store/postgres/mod.rs).
CREATE TABLE counters (
    name  TEXT PRIMARY KEY NOT NULL,
    value BIGINT NOT NULL CHECK (value >= 0)
);
INSERT INTO counters (name, value) VALUES ('serial', 1), ('ipam_next', 0), ('expiry_swept_at', 0);

-- Settings fixed at first start (overlay prefixes, controller public key) or tracked across
-- restarts (policy).
CREATE TABLE settings (
    name  TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);

CREATE TABLE admin_tokens (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    token_hash  BYTEA NOT NULL UNIQUE CHECK (length(token_hash) = 32),
    scope       TEXT NOT NULL CHECK (scope IN ('admin', 'read_only')),
    created_at  BIGINT NOT NULL,
    revoked_at  BIGINT
);

CREATE TABLE enrollment_keys (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key_hash      BYTEA NOT NULL UNIQUE CHECK (length(key_hash) = 32),
    description   TEXT NOT NULL,
    reusable      BOOLEAN NOT NULL,
    max_uses      BIGINT CHECK (max_uses IS NULL OR max_uses > 0),
    uses          BIGINT NOT NULL DEFAULT 0,
    expires_at    BIGINT,
    tags          TEXT NOT NULL,            -- JSON array of strings
    auto_approve  BOOLEAN NOT NULL,
    node_ttl_secs BIGINT CHECK (node_ttl_secs IS NULL OR node_ttl_secs > 0),
    created_at    BIGINT NOT NULL,
    revoked_at    BIGINT,
    CHECK (max_uses IS NULL OR uses <= max_uses)
);

CREATE TABLE nodes (
    id                 BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- a sequence: never reused
    name               TEXT NOT NULL,
    public_key         TEXT NOT NULL UNIQUE,
    ipv4               TEXT NOT NULL UNIQUE,
    ipv6               TEXT NOT NULL UNIQUE,
    state              TEXT NOT NULL CHECK (state IN ('pending', 'approved', 'revoked')),
    tags               TEXT NOT NULL,       -- JSON array of strings, sorted
    endpoints          TEXT NOT NULL,       -- JSON array of skymesh_proto::Endpoint
    advertised_routes  TEXT NOT NULL,       -- JSON array of CIDRs
    approved_routes    TEXT NOT NULL,       -- JSON array of CIDRs, subset of advertised
    credential_hash    BYTEA NOT NULL UNIQUE CHECK (length(credential_hash) = 32),
    enrollment_key_id  BIGINT REFERENCES enrollment_keys (id),
    created_at         BIGINT NOT NULL,
    expires_at         BIGINT
);

-- Every address ever handed out, kept after the node is deleted: a second line of defence
-- (with the high-water mark) against reuse.
CREATE TABLE allocated_addresses (
    ipv4          TEXT NOT NULL UNIQUE,
    ipv6          TEXT NOT NULL UNIQUE,
    node_id       BIGINT NOT NULL,
    allocated_at  BIGINT NOT NULL
);

-- Hash-chained audit log (see controller/src/audit.rs).
CREATE TABLE audit_log (
    seq        BIGINT PRIMARY KEY,
    at         BIGINT NOT NULL,
    actor      TEXT NOT NULL,
    action     TEXT NOT NULL,
    target     TEXT,
    detail     TEXT NOT NULL,
    prev_hash  TEXT NOT NULL,
    hash       TEXT NOT NULL UNIQUE
);

-- What nodes report about themselves: when they were last heard from, the source address the
-- controller saw, and their latest status report (JSON skymesh_proto::StatusReport).
-- Not part of the topology: writing here never bumps the serial.
CREATE TABLE node_status (
    node_id      BIGINT PRIMARY KEY NOT NULL,
    last_seen    BIGINT NOT NULL,
    seen_from    TEXT,
    reported_at  BIGINT,
    report       TEXT
);
