-- One row per request. `seq` is the insertion order that breaks ties between requests of
-- equal priority and age.
CREATE TABLE requests (
    seq                  BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id                   TEXT        NOT NULL UNIQUE,
    project_id           TEXT        NOT NULL,
    user_id              TEXT        NOT NULL,
    request_type         TEXT        NOT NULL,
    -- Claim rank: 0 high, 1 medium, 2 low.
    priority             SMALLINT    NOT NULL CHECK (priority BETWEEN 0 AND 2),
    configuration        JSONB       NOT NULL,
    status               TEXT        NOT NULL CHECK (status IN
                             ('PENDING', 'PROCESSING', 'EXECUTING',
                              'COMPLETED', 'FAILED', 'CANCELLED')),
    progress_stage       TEXT,
    progress_percentage  SMALLINT    NOT NULL DEFAULT 0
                             CHECK (progress_percentage BETWEEN 0 AND 100),
    urls_found           BIGINT      NOT NULL DEFAULT 0,
    content_extracted    BIGINT      NOT NULL DEFAULT 0,
    estimated_completion TIMESTAMPTZ,
    results              JSONB,
    -- One entry per failed attempt, one per status change.
    errors               JSONB       NOT NULL DEFAULT '[]',
    history              JSONB       NOT NULL DEFAULT '[]',
    attempts             INTEGER     NOT NULL DEFAULT 0,
    max_attempts         INTEGER     NOT NULL CHECK (max_attempts >= 1),
    created_at           TIMESTAMPTZ NOT NULL,
    started_at           TIMESTAMPTZ,
    completed_at         TIMESTAMPTZ,
    run_after            TIMESTAMPTZ NOT NULL,
    lease_owner          TEXT,
    lease_token          TEXT,
    lease_expires_at     TIMESTAMPTZ,
    -- A lease exists exactly while a worker holds the request.
    CHECK ((status IN ('PROCESSING', 'EXECUTING')) = (lease_token IS NOT NULL))
);

-- Claim: the pending requests in claim order; small however long the history grows.
CREATE INDEX requests_claim_order ON requests (priority, created_at, seq)
    WHERE status = 'PENDING';

-- Rescue: in-flight requests by lease expiry.
CREATE INDEX requests_lease_expiry ON requests (lease_expires_at)
    WHERE status IN ('PROCESSING', 'EXECUTING');

-- Pruning: finished requests by completion time.
CREATE INDEX requests_finished ON requests (completed_at)
    WHERE status IN ('COMPLETED', 'FAILED', 'CANCELLED');

-- Listing: newest first, overall and per project, user or status.
CREATE INDEX requests_newest ON requests (created_at DESC, id DESC);
CREATE INDEX requests_project_newest ON requests (project_id, created_at DESC, id DESC);
CREATE INDEX requests_user_newest ON requests (user_id, created_at DESC, id DESC);
CREATE INDEX requests_status_newest ON requests (status, created_at DESC, id DESC);

-- Wake-ups for idle workers in every process: new or returned work, and cancels of
-- running requests (so the process running one can stop its executor at once).
CREATE FUNCTION root_orchestrator_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status = 'PENDING' THEN
        PERFORM pg_notify('root_orchestrator:' || TG_TABLE_SCHEMA, 'pending');
    ELSIF NEW.status = 'CANCELLED' AND TG_OP = 'UPDATE'
          AND OLD.status IN ('PROCESSING', 'EXECUTING') THEN
        PERFORM pg_notify('root_orchestrator:' || TG_TABLE_SCHEMA, 'cancelled:' || NEW.id);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER requests_notify
    AFTER INSERT OR UPDATE OF status ON requests
    FOR EACH ROW EXECUTE FUNCTION root_orchestrator_notify();
