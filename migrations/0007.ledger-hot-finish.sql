-- depends: 0006.payload-lz4
-- Every ledger row is written twice: inserted when its event arrives, then given its outcome,
-- processed_at and user when the event is applied. Half of each page is left free for that second
-- version, so Postgres can write it beside the first without touching the five indexes (a HOT update):
-- the payload itself lives in the TOAST table, so a heap row is small and the room costs little.
-- The user is written with the first version when the event names one (`metadata.user_id`,
-- `client_reference_id`), so the second usually leaves every indexed column as it was. In a drain the
-- finishing UPDATE went from 22 to 11 us a row. Only new pages are affected.
ALTER TABLE stripe_events SET (fillfactor = 50);
