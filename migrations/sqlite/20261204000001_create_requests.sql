-- One row per request. Timestamps are microseconds since the Unix epoch, UTC.
-- `seq` is the insertion order that breaks ties between requests of equal priority and age.
CREATE TABLE requests (
    seq                  INTEGER PRIMARY KEY AUTOINCREMENT,
    id                   TEXT    NOT NULL UNIQUE,
    project_id           TEXT    NOT NULL,
    user_id              TEXT    NOT NULL,
    request_type         TEXT    NOT NULL,
    -- Claim rank: 0 high, 1 medium, 2 low.
    priority             INTEGER NOT NULL CHECK (priority BETWEEN 0 AND 2),
    configuration        TEXT    NOT NULL,
    status               TEXT    NOT NULL CHECK (status IN
                             ('PENDING', 'PROCESSING', 'EXECUTING',
                              'COMPLETED', 'FAILED', 'CANCELLED')),
    progress_stage       TEXT,
    progress_percentage  INTEGER NOT NULL DEFAULT 0
                             CHECK (progress_percentage BETWEEN 0 AND 100),
    urls_found           INTEGER NOT NULL DEFAULT 0,
    content_extracted    INTEGER NOT NULL DEFAULT 0,
    estimated_completion INTEGER,
    results              TEXT,
    -- JSON arrays: one entry per failed attempt, one per status change.
    errors               TEXT    NOT NULL DEFAULT '[]',
    history              TEXT    NOT NULL DEFAULT '[]',
    attempts             INTEGER NOT NULL DEFAULT 0,
    max_attempts         INTEGER NOT NULL CHECK (max_attempts >= 1),
    created_at           INTEGER NOT NULL,
    started_at           INTEGER,
    completed_at         INTEGER,
    run_after            INTEGER NOT NULL,
    lease_owner          TEXT,
    lease_token          TEXT,
    lease_expires_at     INTEGER,
    -- A lease exists exactly while a worker holds the request.
    CHECK ((status IN ('PROCESSING', 'EXECUTING')) = (lease_token IS NOT NULL))
);

-- Claim: the pending requests in claim order.
CREATE INDEX requests_claim_order ON requests (priority, created_at, seq)
    WHERE status = 'PENDING';

-- Rescue: in-flight requests by lease expiry.
CREATE INDEX requests_lease_expiry ON requests (lease_expires_at)
    WHERE status IN ('PROCESSING', 'EXECUTING');

-- Pruning: finished requests by completion time.
CREATE INDEX requests_finished ON requests (completed_at)
    WHERE status IN ('COMPLETED', 'FAILED', 'CANCELLED');

-- Listing: newest first, optionally per project.
CREATE INDEX requests_newest ON requests (created_at DESC, id DESC);
CREATE INDEX requests_project_newest ON requests (project_id, created_at DESC, id DESC);
