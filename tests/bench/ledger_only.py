"""The bench's drain ceiling: `paybus processor` with an empty routing table.

It consumes, batches, records every event in the ledger (as `ignored`) and acks, as the processor
does, and applies no domain effect; the gap between its drain and the real one is what the domain
handlers cost. Configured from the environment like the processor: `python -m tests.bench.ledger_only`.
"""

from __future__ import annotations

from processor.service import run
from shared.config import load_settings
from shared.logs import setup_logging


def main() -> None:
    settings = load_settings()
    setup_logging(settings.log_level)
    run(settings, event_handlers={})


if __name__ == "__main__":
    main()
