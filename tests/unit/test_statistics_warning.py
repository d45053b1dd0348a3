"""The processor warns at start when nothing will keep the tables' statistics."""

from __future__ import annotations

import pytest

from processor.service import statistics_warning


def test_no_warning_when_autovacuum_keeps_statistics() -> None:
    assert statistics_warning({"autovacuum": "on", "track_counts": "on"}) is None


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"autovacuum": "off", "track_counts": "on"}, "autovacuum off"),
        ({"autovacuum": "on", "track_counts": "off"}, "track_counts off"),
        ({"autovacuum": "off", "track_counts": "off"}, "autovacuum and track_counts off"),
    ],
)
def test_the_warning_names_what_is_off_and_what_to_do(settings: dict[str, str], named: str) -> None:
    warning = statistics_warning(settings)
    assert warning is not None
    assert f"Postgres has {named}:" in warning
    assert "ANALYZE" in warning and "RUNBOOK" in warning
