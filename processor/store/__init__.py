"""SQL for the domain tables: plain functions that take a connection (the transaction is the caller's)."""
