"""paybus benchmarks, side by side with a peer: `make bench` (`python -m tests.bench`); not part of `make test`."""
