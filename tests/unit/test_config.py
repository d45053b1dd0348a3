"""Configuration: safe development defaults, strict production, every problem named at once."""

from __future__ import annotations

import pytest

from shared.config import DEV_WEBHOOK_SECRET, ConfigError, load_settings


def test_development_defaults_match_the_design() -> None:
    settings = load_settings({})
    assert settings.database_url == "postgresql:///paybus"
    assert settings.amqp_url == "amqp://guest:guest@localhost:5672/"
    assert settings.webhook_secrets == (DEV_WEBHOOK_SECRET,)
    assert settings.webhook_path == "/webhook/stripe"
    assert (settings.ingress_host, settings.ingress_port, settings.metrics_port) == ("127.0.0.1", 8080, 9100)
    assert settings.requests_enabled is True
    assert settings.stripe_livemode is False


def test_webhook_secret_list_and_path_token() -> None:
    settings = load_settings({"STRIPE_WEBHOOK_SECRET": "whsec_a, whsec_b", "WEBHOOK_PATH_TOKEN": "tok-123"})
    assert settings.webhook_secrets == ("whsec_a", "whsec_b")
    assert settings.webhook_path == "/webhook/stripe/tok-123"


def test_production_names_every_missing_and_malformed_variable() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(
            {
                "PAYBUS_ENV": "production",
                "AMQP_URL": "http://wrong",
                "STRIPE_WEBHOOK_SECRET": "not-a-secret-value",
                "INGRESS_PORT": "eighty",
                "PAYBUS_REQUESTS_ENABLED": "maybe",
            }
        )
    text = str(caught.value)
    for name in (
        "DATABASE_URL",
        "AMQP_URL",
        "STRIPE_WEBHOOK_SECRET",
        "STRIPE_SECRET_KEY",
        "STRIPE_PUBLISHABLE_KEY",
        "INGRESS_PORT",
        "PAYBUS_REQUESTS_ENABLED",
    ):
        assert name in text
    assert len(caught.value.problems) == 7
    assert "not-a-secret-value" not in text  # values are never echoed
    assert "eighty" not in text


def test_production_refuses_the_development_secrets() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(
            {
                "PAYBUS_ENV": "production",
                "DATABASE_URL": "postgresql://db/paybus",
                "AMQP_URL": "amqps://mq/",
                "STRIPE_WEBHOOK_SECRET": DEV_WEBHOOK_SECRET,
                "STRIPE_SECRET_KEY": "sk_test_dev",
                "STRIPE_PUBLISHABLE_KEY": "pk_live_real",
            }
        )
    assert [p.split()[0] for p in caught.value.problems] == ["STRIPE_WEBHOOK_SECRET", "STRIPE_SECRET_KEY"]


def test_complete_production_configuration_loads() -> None:
    settings = load_settings(
        {
            "PAYBUS_ENV": "production",
            "DATABASE_URL": "postgresql://db/paybus",
            "AMQP_URL": "amqps://mq/",
            "STRIPE_WEBHOOK_SECRET": "whsec_live_1,whsec_live_2",
            "STRIPE_SECRET_KEY": "sk_live_x",
            "STRIPE_PUBLISHABLE_KEY": "pk_live_x",
            "STRIPE_LIVEMODE": "true",
        }
    )
    assert settings.production and settings.stripe_livemode


def test_the_event_loop_is_uvloop_unless_asyncio_is_asked_for() -> None:
    import asyncio

    import uvloop

    from shared.loops import loop_factory

    assert load_settings({}).event_loop == "uvloop"
    assert load_settings({"PAYBUS_EVENT_LOOP": " Asyncio "}).event_loop == "asyncio"
    with pytest.raises(ConfigError) as caught:
        load_settings({"PAYBUS_EVENT_LOOP": "trio"})
    assert caught.value.problems == ["PAYBUS_EVENT_LOOP must be uvloop or asyncio"]
    for kind, expected in (("uvloop", uvloop.Loop), ("asyncio", asyncio.BaseEventLoop)):
        loop = loop_factory(kind)()
        try:
            assert isinstance(loop, expected)
            assert (kind == "uvloop") == isinstance(loop, uvloop.Loop)
        finally:
            loop.close()
