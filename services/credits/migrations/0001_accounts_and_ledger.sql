-- Accounts and the append-only ledger. The balance on an account is a cached sum of its
-- ledger entries: every change to it is written in the same transaction as the entry
-- that explains it, and balance_after on each entry lets anyone audit the chain.
-- Amounts are bigint hundredths of a credit (1 credit = 100), never floats.

CREATE TABLE credits.accounts (
    user_id            text        PRIMARY KEY
                       CHECK (char_length(user_id) BETWEEN 1 AND 128),
    -- The storage quota follows from the plan in code, so changing a quota needs no migration.
    plan               text        NOT NULL DEFAULT 'FREE'
                       CHECK (plan IN ('FREE', 'PRO', 'ENTERPRISE')),
    -- The database itself refuses an overdraft, whatever a future code path gets wrong.
    balance            bigint      NOT NULL CHECK (balance >= 0),
    storage_used_bytes bigint      NOT NULL DEFAULT 0 CHECK (storage_used_bytes >= 0),
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE credits.ledger_entries (
    entry_id      uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id       text        NOT NULL REFERENCES credits.accounts (user_id),
    kind          text        NOT NULL
                  CHECK (kind IN ('GRANT', 'CHARGE', 'REFUND', 'ADJUSTMENT')),
    -- Signed, so that the entries of an account sum to its balance.
    amount        bigint      NOT NULL CHECK (amount <> 0),
    balance_after bigint      NOT NULL CHECK (balance_after >= 0),
    reference     text        NOT NULL DEFAULT '',
    -- The caller's idempotency key: a retried request finds its first entry instead of
    -- writing a second one.
    request_id    text        NOT NULL CHECK (request_id <> ''),
    -- A refund names the charge it gives back, so "at most the charge" is a query.
    refund_of     uuid        REFERENCES credits.ledger_entries (entry_id),
    created_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT ledger_entries_request_unique UNIQUE (user_id, request_id),
    CONSTRAINT ledger_entries_sign CHECK (
        (kind IN ('GRANT', 'REFUND') AND amount > 0)
        OR (kind = 'CHARGE' AND amount < 0)
        OR kind = 'ADJUSTMENT'
    ),
    CONSTRAINT ledger_entries_refund_names_charge CHECK ((kind = 'REFUND') = (refund_of IS NOT NULL))
);

-- ListLedgerEntries pages newest first per user.
CREATE INDEX ledger_entries_user_newest ON credits.ledger_entries (user_id, created_at DESC, entry_id DESC);
CREATE INDEX ledger_entries_refund_of ON credits.ledger_entries (refund_of) WHERE refund_of IS NOT NULL;

-- Append-only: a correction is a new ADJUSTMENT entry, never an edit. A trigger (rather
-- than REVOKE) also binds the owner role the services connect as.
CREATE FUNCTION credits.refuse_ledger_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'credits.ledger_entries is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER ledger_entries_append_only
    BEFORE UPDATE OR DELETE ON credits.ledger_entries
    FOR EACH ROW EXECUTE FUNCTION credits.refuse_ledger_change();

CREATE TRIGGER ledger_entries_no_truncate
    BEFORE TRUNCATE ON credits.ledger_entries
    FOR EACH STATEMENT EXECUTE FUNCTION credits.refuse_ledger_change();
