"""Chains of a batch (which events may share rows) and the claims that stop two chains sharing a key."""

from __future__ import annotations

import pytest

from processor.chains import keys, split
from processor.events import Event, decode_event
from processor.store.locks import Claims, Entangled
from shared import samples


def _event(event_type: str, obj: dict[str, object]) -> Event:
    return decode_event(samples.encode(samples.event(event_type, obj)))


def test_keys_are_the_stripe_objects_and_users_an_object_names_at_any_depth() -> None:
    obj = {
        "id": "in_1",
        "customer": {"id": "cus_1", "object": "customer"},  # expanded
        "payment_intent": "pi_1",
        "status": "requires_payment_method",  # an underscore is not an id
        "lines": {"data": [{"subscription": "sub_1", "price": {"id": "price_1", "product": "prod_1"}}]},
        "metadata": {"user_id": "u-1"},
        "client_reference_id": "u-2",
        "account": "acct_1",
        "payment_method": "pm_1",
    }
    assert set(keys(obj)) == {"in_1", "cus_1", "pi_1", "sub_1", "user:u-1", "user:u-2"}


def test_events_naming_a_common_object_or_user_share_a_chain_in_batch_order() -> None:
    user = samples.new_id("u")
    events = [
        _event("payment_intent.created", samples.payment_intent(intent_id="pi_a")),  # 0
        _event("payment_intent.created", samples.payment_intent(intent_id="pi_b")),  # 1
        _event("charge.succeeded", samples.charge(charge_id="ch_c", intent_id="pi_c")),  # 2
        _event("payment_intent.succeeded", samples.payment_intent(intent_id="pi_a")),  # 3
        _event("refund.created", samples.refund(charge_id="ch_c")),  # 4: through the charge
        _event("customer.created", samples.customer(customer_id="cus_d", user_id=user)),  # 5
        _event("payment_intent.created", samples.payment_intent(intent_id="pi_e", user_id=user)),  # 6
    ]
    assert split(events) == [[0, 3], [1], [2, 4], [5, 6]]


def test_an_event_naming_two_chains_joins_them_into_one_in_batch_order() -> None:
    events = [
        _event("payment_intent.created", samples.payment_intent(intent_id="pi_a")),
        _event("charge.succeeded", samples.charge(charge_id="ch_b")),
        _event("payment_intent.created", samples.payment_intent(intent_id="pi_x")),
        _event("charge.succeeded", samples.charge(charge_id="ch_b", intent_id="pi_a")),
    ]
    assert split(events) == [[0, 1, 3], [2]]


def test_a_batch_of_unrelated_events_is_one_chain_each() -> None:
    events = [_event("payment_intent.succeeded", samples.payment_intent()) for _ in range(5)]
    assert split(events) == [[0], [1], [2], [3], [4]]


def test_a_key_claimed_by_one_chain_stops_another() -> None:
    claims = Claims()
    claims.claim(0, ["pi:a", "cs:a"])
    claims.claim(0, ["pi:a"])  # again by the same chain: fine
    claims.claim(1, ["pi:b"])
    with pytest.raises(Entangled, match="pi:a"):
        claims.claim(1, ["pi:c", "pi:a"])


def test_chains_may_share_a_customer_they_only_read_but_not_one_that_one_of_them_maps() -> None:
    claims = Claims()
    claims.claim(0, ["cus:x"], exclusive=False)
    claims.claim(1, ["cus:x"], exclusive=False)
    with pytest.raises(Entangled):
        claims.claim(0, ["cus:x"])  # chain 1 reads it too
    claims.claim(2, ["cus:y"], exclusive=False)
    claims.claim(2, ["cus:y"])  # the only reader may take it over
    with pytest.raises(Entangled):
        claims.claim(3, ["cus:y"], exclusive=False)
