"""Operator tools behind `paybus dlq|replay|reconcile|inspect`; imported by the CLI only."""
