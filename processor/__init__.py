"""paybus processor: Stripe events and payment requests become state in Postgres, exactly once."""
