-- depends: 0003.requests-outbox
-- `paybus replay --force`: an operator asks that an event already in the ledger run through its
-- handler once more (after a bug fix). The request is a mark on the ledger row that the one delivery
-- re-running the handler clears in its own transaction, so redeliveries stay duplicates.
ALTER TABLE stripe_events
    ADD COLUMN reapply_requested_at timestamptz,
    ADD COLUMN reapplied_at timestamptz,
    ADD COLUMN reapply_count integer NOT NULL DEFAULT 0;
