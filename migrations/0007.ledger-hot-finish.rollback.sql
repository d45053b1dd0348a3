ALTER TABLE stripe_events RESET (fillfactor);
