"""Which user an object names: canonical UUIDs, other spellings of one, and anything else."""

from __future__ import annotations

import uuid

import pytest

from processor.users import as_uuid, user_from_object

CANONICAL = "7d3f7c8e-5555-4a5b-9c9d-000000000005"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (CANONICAL, CANONICAL),
        (CANONICAL.upper(), CANONICAL),
        (CANONICAL.replace("-", ""), CANONICAL),
        ("{" + CANONICAL + "}", CANONICAL),
        ("urn:uuid:" + CANONICAL, CANONICAL),
        (CANONICAL + "\n", None),
        (CANONICAL + "0", None),
        ("not-a-uuid", None),
        ("", None),
        (None, None),
        (42, None),
    ],
)
def test_as_uuid_gives_the_canonical_form_or_none(value: object, expected: str | None) -> None:
    assert as_uuid(value) == expected


def test_random_uuids_in_any_case_come_back_canonical() -> None:
    for _ in range(200):
        value = uuid.uuid4()
        assert as_uuid(str(value).upper()) == str(value)
        assert as_uuid(str(value)) == str(value)


def test_metadata_user_first_then_client_reference_id() -> None:
    other = str(uuid.uuid4())
    assert user_from_object({"metadata": {"user_id": CANONICAL}, "client_reference_id": other}) == CANONICAL
    assert user_from_object({"metadata": {"user_id": "nope"}, "client_reference_id": other}) == other
    assert user_from_object({"metadata": None}) is None
