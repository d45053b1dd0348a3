"""The processor with part of its routing table, to measure what the domain handlers cost.

    python -m tests.bench.handlers_subset none|without-payment-intents|payment-intents-only

`none` is the drain's ceiling: it consumes, batches, records every event in the ledger (as `ignored`)
and acks, as the processor does, and applies no domain effect. The other two leave out or keep only
the `payment_intent.*` handlers; events without a handler are recorded as `ignored`. Configured from
the environment like `paybus processor`, and run by `tests.bench.drain --variant HANDLERS=…` and, with
`none`, by `make bench`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from processor.events import Handler, handlers
from processor.service import run
from shared.config import load_settings
from shared.logs import setup_logging

SUBSETS: dict[str, Callable[[str], bool]] = {
    "none": lambda event_type: False,
    "without-payment-intents": lambda event_type: not event_type.startswith("payment_intent."),
    "payment-intents-only": lambda event_type: event_type.startswith("payment_intent."),
}


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in SUBSETS:
        print(f"usage: python -m tests.bench.handlers_subset {'|'.join(SUBSETS)}", file=sys.stderr)
        return 2
    keep = SUBSETS[argv[0]]
    table: dict[str, Handler] = {t: h for t, h in handlers().items() if keep(t)}
    settings = load_settings()
    setup_logging(settings.log_level)
    run(settings, event_handlers=table)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
