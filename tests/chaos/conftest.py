"""Chaos runs only through `make chaos` (PAYBUS_CHAOS=1): it takes minutes, `make test` must not."""

from __future__ import annotations

import os

collect_ignore_glob = [] if os.environ.get("PAYBUS_CHAOS") else ["test_*.py"]
