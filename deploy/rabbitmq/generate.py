"""Write deploy/rabbitmq/definitions.json: the topology (from shared.amqp) plus least-privilege users.

    .venv/bin/python deploy/rabbitmq/generate.py           # rewrite the file
    .venv/bin/python deploy/rabbitmq/generate.py --check   # exit 1 when the committed file is stale

The users carry no password (empty hash: password login is refused until one is set); see
deploy/README.md "RabbitMQ users" and deploy/rabbitmq/set_passwords.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Final

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from shared.amqp import definitions  # noqa: E402

TARGET: Final = Path(__file__).resolve().parent / "definitions.json"
RABBIT_VERSION: Final = "3.10.8"
VHOST: Final = "/"

# The permission triple RabbitMQ checks is (configure, write, read), each a regex over resource names.
# "^$" matches no resource. Why each grant exists:
ROLES: Final[dict[str, dict[str, Any]]] = {
    # Verifies and publishes; runs with PAYBUS_DECLARE_TOPOLOGY=false (a passive check needs no right).
    "paybus-ingress": {
        "tags": [],
        "configure": "^$",
        "write": r"^stripe\.events$",
        "read": "^$",
    },
    # Consumes its two work queues; republishes failures to the retry and dead-letter exchanges,
    # relays the outbox to paybus.events and answers requests through the default exchange
    # (amq.default) to each client's reply queue. Also runs with PAYBUS_DECLARE_TOPOLOGY=false.
    "paybus-processor": {
        "tags": [],
        "configure": "^$",
        "write": r"^(amq\.default|paybus\.retry|paybus\.dead-letter|paybus\.events)$",
        "read": r"^paybus\.(stripe-events|payment-requests)$",
    },
    # A backend service: publishes payment requests, declares and consumes its own server-named,
    # exclusive reply queue (amq.gen-*; exclusive means no other connection can read it). Direct
    # reply-to (amq.rabbitmq.reply-to) needs no grant at all.
    "paybus-client": {
        "tags": [],
        "configure": r"^amq\.gen-.*$",
        "write": r"^paybus\.requests$",
        "read": r"^amq\.gen-.*$",
    },
    # Humans and the paybus CLI (dlq, replay, reconcile, request): everything paybus names, nothing else.
    # Loading definitions and managing users stay with the broker's own administrator.
    "paybus-operator": {
        "tags": ["monitoring"],
        "configure": r"^(stripe\.events|paybus\..*|amq\.gen-.*)$",
        "write": r"^(stripe\.events|paybus\..*|amq\.default)$",
        "read": r"^(stripe\.events|paybus\..*|amq\.gen-.*)$",
    },
}


def build() -> dict[str, Any]:
    topology = definitions(vhost=VHOST)
    return {
        "rabbit_version": RABBIT_VERSION,
        "users": [
            {
                "name": name,
                "password_hash": "",
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": role["tags"],
                "limits": {},
            }
            for name, role in ROLES.items()
        ],
        "vhosts": [{"name": VHOST}],
        "permissions": [
            {"user": name, "vhost": VHOST, **{k: role[k] for k in ("configure", "write", "read")}}
            for name, role in ROLES.items()
        ],
        **topology,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="only compare with the committed file")
    args = parser.parse_args()
    text = render()
    if args.check:
        if TARGET.read_text() != text:
            print(f"{TARGET} is stale: run deploy/rabbitmq/generate.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
