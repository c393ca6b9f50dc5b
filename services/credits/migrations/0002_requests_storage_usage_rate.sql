-- Everything the credits methods beyond GetAccount need: an idempotency record per request,
-- a total order on the ledger, a storage ledger, generation records for usage, and the
-- per-user token bucket that rate-limits Charge. Amounts stay bigint hundredths of a credit.

-- Ledger order. created_at is the transaction's start, so two entries can share it; seq is
-- taken while the account row is locked, so an account's entries in seq order are exactly
-- the order in which their balance_after values chain. Pages are keyed on it.
ALTER TABLE credits.ledger_entries ADD COLUMN seq bigint GENERATED ALWAYS AS IDENTITY;
CREATE UNIQUE INDEX ledger_entries_user_seq ON credits.ledger_entries (user_id, seq);
DROP INDEX credits.ledger_entries_user_newest;

-- No amount and no balance can come near int64: 10^12 per movement (10 billion credits),
-- 10^15 per balance. Every running sum of an account's ledger is one of its balance_after
-- values, so it is bounded too. The service refuses these first with a clear error; the
-- checks are the last line of defence.
ALTER TABLE credits.ledger_entries
    ADD CONSTRAINT ledger_entries_amount_limit CHECK (amount BETWEEN -1000000000000 AND 1000000000000),
    ADD CONSTRAINT ledger_entries_balance_limit CHECK (balance_after <= 1000000000000000);
ALTER TABLE credits.accounts
    ADD CONSTRAINT accounts_balance_limit CHECK (balance <= 1000000000000000);

-- One row per (user, request_id) the service ever acted on, whatever the method: the
-- Stripe-style idempotency record. A replay compares its parameters with the first ones and
-- answers `answer` again; other parameters are refused. A refusal that is the answer (the
-- balance was short, the quota full) is remembered too, so that a caller who acted on it can
-- never see the same request succeed later (TigerBeetle's id_already_failed). Written in the
-- same transaction as the effect, so an acknowledged request always has both.
CREATE TABLE credits.requests (
    user_id    text        NOT NULL REFERENCES credits.accounts (user_id),
    request_id text        NOT NULL CHECK (request_id <> ''),
    operation  text        NOT NULL
               CHECK (operation IN ('WELCOME_GRANT', 'GRANT', 'CHARGE', 'REFUND', 'RESERVE_STORAGE', 'RELEASE_STORAGE')),
    parameters jsonb       NOT NULL,
    -- 'DONE', or the ErrorInfo reason of the refusal that was the answer.
    outcome    text        NOT NULL,
    answer     jsonb       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, request_id)
);

-- The append-only guard now names whichever table it guards (it guards three below).
CREATE OR REPLACE FUNCTION credits.refuse_ledger_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '%.% is append-only: % is not allowed', TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

-- What was answered stays answered: a record is never rewritten or removed.
CREATE TRIGGER requests_append_only
    BEFORE UPDATE OR DELETE ON credits.requests
    FOR EACH ROW EXECUTE FUNCTION credits.refuse_ledger_change();
CREATE TRIGGER requests_no_truncate
    BEFORE TRUNCATE ON credits.requests
    FOR EACH STATEMENT EXECUTE FUNCTION credits.refuse_ledger_change();

-- A charge's request_id names that charge whoever the user: the same key with another user
-- is a caller's mix-up, refused like other arguments. (Refunds and the rest are keyed per
-- user only: two users' refunds may share a request_id.)
CREATE UNIQUE INDEX requests_charge_unique ON credits.requests (request_id) WHERE operation = 'CHARGE';

-- Accounts opened before this migration have their welcome grant in the ledger only; its
-- request id must be taken here too, or a caller's Charge could reuse it.
INSERT INTO credits.requests (user_id, request_id, operation, parameters, outcome, answer, created_at)
SELECT user_id, request_id, 'WELCOME_GRANT', jsonb_build_object('amount', amount),
       'DONE', jsonb_build_object('entry_id', entry_id::text, 'balance', balance_after), created_at
FROM credits.ledger_entries
WHERE kind = 'GRANT' AND request_id = 'welcome:' || user_id;

-- Storage moves, append-only like the money ledger: storage_used_bytes on the account is
-- their sum, and each reservation records the quota it was checked against.
CREATE TABLE credits.storage_entries (
    entry_id    uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    seq         bigint      GENERATED ALWAYS AS IDENTITY,
    user_id     text        NOT NULL REFERENCES credits.accounts (user_id),
    kind        text        NOT NULL CHECK (kind IN ('RESERVE', 'RELEASE')),
    -- Signed: reservations add, releases take away (at most what was in use, so maybe 0).
    bytes       bigint      NOT NULL,
    used_after  bigint      NOT NULL CHECK (used_after >= 0),
    quota_bytes bigint      NOT NULL,
    request_id  text        NOT NULL CHECK (request_id <> ''),
    created_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT storage_entries_request_unique UNIQUE (user_id, request_id),
    CONSTRAINT storage_entries_sign CHECK (
        (kind = 'RESERVE' AND bytes > 0 AND used_after <= quota_bytes) OR (kind = 'RELEASE' AND bytes <= 0)
    )
);
CREATE INDEX storage_entries_user_seq ON credits.storage_entries (user_id, seq);

CREATE TRIGGER storage_entries_append_only
    BEFORE UPDATE OR DELETE ON credits.storage_entries
    FOR EACH ROW EXECUTE FUNCTION credits.refuse_ledger_change();
CREATE TRIGGER storage_entries_no_truncate
    BEFORE TRUNCATE ON credits.storage_entries
    FOR EACH STATEMENT EXECUTE FUNCTION credits.refuse_ledger_change();

-- One row per generation job: the job id is the idempotency key of RecordGeneration, and
-- `answer` is the usage the first call returned.
CREATE TABLE credits.generations (
    user_id          text        NOT NULL REFERENCES credits.accounts (user_id),
    job_id           text        NOT NULL CHECK (job_id <> ''),
    model            text        NOT NULL CHECK (model <> ''),
    images_requested integer     NOT NULL CHECK (images_requested > 0),
    images_delivered integer     NOT NULL CHECK (images_delivered BETWEEN 0 AND images_requested),
    bytes_stored     bigint      NOT NULL CHECK (bytes_stored >= 0),
    request_id       text        NOT NULL DEFAULT '',
    answer           jsonb       NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, job_id)
);

-- The token bucket of each user's charges, on the account row itself: a charge locks that
-- row anyway, so taking a token costs no second row, lock or write. NULL means a full bucket
-- (never charged). numeric keeps fractions of a token exact; the bucket refills continuously
-- at CHARGE_RATE_PER_SECOND up to CHARGE_BURST, both applied when a charge arrives (a new
-- setting takes effect at once), and every credits process shares it.
ALTER TABLE credits.accounts
    ADD COLUMN charge_tokens    numeric     CHECK (charge_tokens >= 0),
    ADD COLUMN charge_tokens_at timestamptz,
    ADD CONSTRAINT accounts_charge_bucket_whole CHECK ((charge_tokens IS NULL) = (charge_tokens_at IS NULL));
