#!/usr/bin/env python3
"""Print definitions.json with password hashes filled in from the environment (stdlib only).

    PAYBUS_INGRESS_PASSWORD=... PAYBUS_PROCESSOR_PASSWORD=... \\
        python3 deploy/rabbitmq/set_passwords.py [--vhost paybus] > /secure/place/definitions.json

The variable for user ``paybus-ingress`` is ``PAYBUS_INGRESS_PASSWORD`` (upper case, ``-`` → ``_``).
A user without one keeps an empty hash, which RabbitMQ treats as "no password login". The output is a
secret: write it where only the broker can read it (a Kubernetes Secret, a root-only file), never to git.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any

DEFAULT_SOURCE = Path(__file__).resolve().parent / "definitions.json"


def password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's rabbit_password_hashing_sha256: base64(salt ‖ sha256(salt ‖ utf8 password)), 4-byte salt."""
    salt = secrets.token_bytes(4) if salt is None else salt
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def variable_for(user: str) -> str:
    return user.upper().replace("-", "_").replace(".", "_") + "_PASSWORD"


def fill(definitions: dict[str, Any], environ: dict[str, str], vhost: str | None = None) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(json.dumps(definitions))
    for user in result.get("users", []):
        password = environ.get(variable_for(user["name"]), "")
        if password:
            user["password_hash"] = password_hash(password)
            user["hashing_algorithm"] = "rabbit_password_hashing_sha256"
    if vhost is not None:
        result["vhosts"] = [{"name": vhost}]
        for section in ("permissions", "exchanges", "queues", "bindings", "policies", "parameters"):
            for item in result.get(section, []):
                item["vhost"] = vhost
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="definitions file to start from")
    parser.add_argument("--vhost", help="put everything in this vhost instead of the file's")
    parser.add_argument("--require-all", action="store_true", help="fail unless every user gets a password")
    args = parser.parse_args()
    definitions = json.loads(args.source.read_text())
    missing = [
        variable_for(u["name"])
        for u in definitions.get("users", [])
        if not os.environ.get(variable_for(u["name"]))
    ]
    if args.require_all and missing:
        print("set_passwords: missing " + ", ".join(missing), file=sys.stderr)
        return 2
    json.dump(fill(definitions, dict(os.environ), args.vhost), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
