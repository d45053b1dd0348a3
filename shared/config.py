"""Settings read from the environment once at start-up; every bad key is reported at once."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import msgspec

REPO_ROOT: Final = Path(__file__).resolve().parent.parent

# Development-only signing secret. Production refuses to start without a real one.
DEV_WEBHOOK_SECRET: Final = "whsec_dev_paybus_local_only"  # noqa: S105


class ConfigError(Exception):
    """One or more environment variables are missing or malformed; ``problems`` lists each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(problems))


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    env: str = "development"
    database_url: str = "postgresql:///paybus"
    amqp_url: str = "amqp://guest:guest@localhost:5672/"
    webhook_secrets: tuple[str, ...] = (DEV_WEBHOOK_SECRET,)
    webhook_path_token: str = ""
    stripe_secret_key: str = "sk_test_dev"  # noqa: S105
    stripe_publishable_key: str = "pk_test_dev"
    checkout_success_url: str = "http://localhost:8080/checkout/success"
    checkout_cancel_url: str = "http://localhost:8080/checkout/cancel"
    portal_return_url: str = "http://localhost:8080/account"
    requests_enabled: bool = True
    stripe_api_base: str = "https://api.stripe.com"
    stripe_api_version: str = ""
    stripe_livemode: bool = False
    catalog_path: str = str(REPO_ROOT / "catalog.toml")
    ingress_host: str = "127.0.0.1"
    ingress_port: int = 8080
    ingress_max_body: int = 1024 * 1024
    ingress_workers: int = 1
    publish_timeout: float = 5.0
    metrics_port: int = 9100
    prefetch: int = 512  # > 2 x batch_size: the next batch fills while one commits
    batch_size: int = 200
    log_level: str = "INFO"
    retry_delays_ms: tuple[int, ...] = (1_000, 5_000, 30_000, 120_000, 600_000)
    grace_days: int = 3
    # false: the topology is pre-loaded (deploy/rabbitmq/definitions.json) and the services only check
    # it passively, so their broker users need no configure permission (deploy/README.md).
    declare_topology: bool = True
    # uvloop: about a fifth less CPU per webhook and a tenth less per event than asyncio's own loop
    # (tests/bench/README.md); asyncio stays selectable, e.g. to rule the loop out when debugging.
    event_loop: str = "uvloop"

    @property
    def production(self) -> bool:
        return self.env == "production"

    @property
    def webhook_path(self) -> str:
        return f"/webhook/stripe/{self.webhook_path_token}" if self.webhook_path_token else "/webhook/stripe"


class Invalid(ValueError):
    """A parser's own message, safe to print (it never contains the value)."""


def _text(raw: str) -> str:
    if not raw.strip():
        raise Invalid("must not be empty")
    return raw.strip()


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise Invalid("must be true or false")


def _port(raw: str) -> int:
    value = int(raw)
    if not 0 <= value <= 65535:
        raise Invalid("must be a port number 0-65535")
    return value


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise Invalid("must be a positive integer")
    return value


def _positive_float(raw: str) -> float:
    value = float(raw)
    if value <= 0:
        raise Invalid("must be a positive number")
    return value


def _url(*schemes: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        parts = urlsplit(raw.strip())
        if parts.scheme not in schemes:
            raise Invalid(f"must be a {' or '.join(schemes)} URL")
        return raw.strip()

    return parse


def _secrets(raw: str) -> tuple[str, ...]:
    secrets = tuple(s.strip() for s in raw.split(",") if s.strip())
    if not secrets:
        raise Invalid("must name at least one signing secret")
    for secret in secrets:
        if not secret.startswith("whsec_"):
            raise Invalid("must be whsec_... secrets, comma-separated")
    return secrets


def _token(raw: str) -> str:
    value = raw.strip()
    if value and (
        not value.isascii() or "/" in value or not value.replace("-", "").replace("_", "").isalnum()
    ):
        raise Invalid("may contain only letters, digits, - and _")
    return value


def _env(raw: str) -> str:
    value = raw.strip().lower()
    if value not in {"development", "production"}:
        raise Invalid("must be development or production")
    return value


def _loop(raw: str) -> str:
    value = raw.strip().lower()
    if value not in {"uvloop", "asyncio"}:
        raise Invalid("must be uvloop or asyncio")
    return value


def _level(raw: str) -> str:
    value = raw.strip().upper()
    if value not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
        raise Invalid("must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
    return value


def _delays(raw: str) -> tuple[int, ...]:
    delays = tuple(int(part) for part in raw.split(",") if part.strip())
    if not delays or any(d <= 0 for d in delays):
        raise Invalid("must be a comma-separated list of positive milliseconds")
    return delays


# variable -> (field, parser, required in production)
_VARIABLES: Final[dict[str, tuple[str, Callable[[str], Any], bool]]] = {
    "DATABASE_URL": ("database_url", _url("postgresql", "postgres"), True),
    "AMQP_URL": ("amqp_url", _url("amqp", "amqps"), True),
    "STRIPE_WEBHOOK_SECRET": ("webhook_secrets", _secrets, True),
    "WEBHOOK_PATH_TOKEN": ("webhook_path_token", _token, False),
    "STRIPE_SECRET_KEY": ("stripe_secret_key", _text, True),
    "STRIPE_PUBLISHABLE_KEY": ("stripe_publishable_key", _text, True),
    "CHECKOUT_SUCCESS_URL": ("checkout_success_url", _url("http", "https"), False),
    "CHECKOUT_CANCEL_URL": ("checkout_cancel_url", _url("http", "https"), False),
    "PORTAL_RETURN_URL": ("portal_return_url", _url("http", "https"), False),
    "PAYBUS_REQUESTS_ENABLED": ("requests_enabled", _bool, False),
    "STRIPE_API_BASE": ("stripe_api_base", _url("http", "https"), False),
    "STRIPE_API_VERSION": ("stripe_api_version", _text, False),
    "STRIPE_LIVEMODE": ("stripe_livemode", _bool, False),
    "CATALOG_PATH": ("catalog_path", _text, False),
    "INGRESS_HOST": ("ingress_host", _text, False),
    "INGRESS_PORT": ("ingress_port", _port, False),
    "INGRESS_MAX_BODY": ("ingress_max_body", _positive_int, False),
    "INGRESS_WORKERS": ("ingress_workers", _positive_int, False),
    "PUBLISH_TIMEOUT": ("publish_timeout", _positive_float, False),
    "METRICS_PORT": ("metrics_port", _port, False),
    "PROCESSOR_PREFETCH": ("prefetch", _positive_int, False),
    "PROCESSOR_BATCH": ("batch_size", _positive_int, False),
    "LOG_LEVEL": ("log_level", _level, False),
    "PAYBUS_RETRY_DELAYS_MS": ("retry_delays_ms", _delays, False),
    "ENTITLEMENT_GRACE_DAYS": ("grace_days", _positive_int, False),
    "PAYBUS_DECLARE_TOPOLOGY": ("declare_topology", _bool, False),
    "PAYBUS_EVENT_LOOP": ("event_loop", _loop, False),
}

# Values that must never be accepted in production even when set explicitly.
_DEV_ONLY_VALUES: Final = {
    "STRIPE_WEBHOOK_SECRET": DEV_WEBHOOK_SECRET,
    "STRIPE_SECRET_KEY": "sk_test_dev",
    "STRIPE_PUBLISHABLE_KEY": "pk_test_dev",
}


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read every variable of DESIGN §3; raise ConfigError naming each bad one."""
    env = os.environ if environ is None else environ
    problems: list[str] = []
    values: dict[str, Any] = {}
    try:
        values["env"] = _env(env.get("PAYBUS_ENV", "development"))
    except Invalid as exc:
        problems.append(f"PAYBUS_ENV {exc}")
        values["env"] = "production"  # judge the rest strictly when the mode itself is unclear
    production = values["env"] == "production"
    for name, (field, parse, required) in _VARIABLES.items():
        raw = env.get(name)
        if raw is None or (raw.strip() == "" and required):
            if production and required:
                problems.append(f"{name} is required in production")
            continue
        try:
            values[field] = parse(raw)
        except Invalid as exc:
            problems.append(f"{name} {exc}")
            continue
        except ValueError:  # e.g. int(): its message would echo the value, which may be a secret
            problems.append(f"{name} is malformed")
            continue
        if production and _DEV_ONLY_VALUES.get(name) in {raw.strip(), *raw.split(",")}:
            problems.append(f"{name} must not use the development default in production")
    if problems:
        raise ConfigError(problems)
    return Settings(**values)
