"""paybus benchmarks beside a peer: `make bench` runs `python -m tests.bench`; `make test` does not."""
