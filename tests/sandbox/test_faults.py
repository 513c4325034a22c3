"""Fault settings: validation, environment, and which outcome a random draw picks."""

from __future__ import annotations

import random

import pytest

from invoice_worker.sandbox.faults import HOSTILE, OUTCOMES, REPLIES, Faults, hostile

RATES = (
    "error_500", "error_502", "error_503", "rate_limit", "rate_limit_bare", "timeout",
    "commit_then_drop", "commit_then_502", "answer_wrong_id", "answer_bad_url",
    "answer_wrong_amount", "answer_wrong_currency", "answer_huge", "trickle",
)  # fmt: skip


def test_faults_validate_their_rates() -> None:
    with pytest.raises(ValueError, match="error_500"):
        Faults(error_500=1.5)
    with pytest.raises(ValueError, match="latency_ms"):
        Faults(latency_ms=-1)
    with pytest.raises(ValueError, match="trickle_seconds"):
        Faults(trickle_seconds=61)
    assert Faults(huge_bytes=1 << 32).huge_bytes == 1 << 32
    with pytest.raises(ValueError, match="huge_bytes"):
        Faults(huge_bytes=-1)


def test_faults_from_env() -> None:
    environ = {
        "INVOICE_SANDBOX_ERROR_502": "0.1",
        "INVOICE_SANDBOX_LATENCY_MS": "200",
        "INVOICE_SANDBOX_RETRY_AFTER": "3",
        "INVOICE_SANDBOX_SEED": "42",
        "INVOICE_SANDBOX_HUGE_BYTES": "1000",
        "INVOICE_SANDBOX_TRICKLE_SECONDS": "0.5",
        "INVOICE_SANDBOX_TIMEOUT": "",
        "INVOICE_API_KEY": "ignored",
    }
    faults = Faults.from_env(environ)
    assert faults == Faults(
        error_502=0.1, latency_ms=200, retry_after=3, seed=42, huge_bytes=1000, trickle_seconds=0.5
    )
    assert isinstance(faults.huge_bytes, int)
    assert faults.to_dict()["error_502"] == 0.1
    with pytest.raises(ValueError, match="error_502"):
        Faults.from_env({"INVOICE_SANDBOX_ERROR_502": "often"})
    with pytest.raises(ValueError, match="error_503"):
        Faults.from_env({"INVOICE_SANDBOX_ERROR_503": "2"})


@pytest.mark.parametrize(
    ("draw", "expected"),
    [(0.0, "500"), (0.2499, "500"), (0.25, "429"), (0.7499, "429"), (0.75, "ok"), (0.9999, "ok")],
)
def test_a_draw_takes_the_first_outcome_whose_cumulative_rate_exceeds_it(
    draw: float, expected: str
) -> None:
    assert Faults(error_500=0.25, rate_limit=0.5).outcome(draw) == expected


def test_every_rate_has_its_own_outcome() -> None:
    assert Faults().outcome(0.0) == "ok"
    outcomes = [Faults.from_dict({rate: 1}).outcome(0.9999) for rate in RATES]
    assert sorted(outcomes) == sorted(OUTCOMES - {"ok"})
    assert set(REPLIES) <= OUTCOMES


DATA = {
    "foreign_id": "a",
    "url": "https://x.example/i/1",
    "amount": "0.01230000",
    "currency": "BTC",
}


@pytest.mark.parametrize(
    ("outcome", "changed"),
    [
        ("answer_wrong_id", {"foreign_id": "a-other"}),
        ("answer_bad_url", {"url": "javascript:alert(1)"}),
        ("answer_wrong_amount", {"amount": "1.01230000"}),
        ("answer_wrong_currency", {"currency": "ETH"}),
    ],
)
def test_a_hostile_answer_changes_one_field(outcome: str, changed: dict[str, str]) -> None:
    assert hostile(outcome, DATA, None) == {**DATA, **changed}
    assert outcome in HOSTILE


def test_hostile_answers_are_the_four_small_ones() -> None:
    other = {**DATA, "foreign_id": "b", "url": "https://x.example/i/2"}
    assert hostile("answer_wrong_id", DATA, other) == other
    assert hostile("answer_wrong_currency", {**DATA, "currency": "ETH"}, None)["currency"] == "BTC"
    assert {"answer_huge", "trickle"} & HOSTILE == set()
    with pytest.raises(ValueError, match="trickle"):
        hostile("trickle", DATA, other)


CALLBACK_RATES = (
    "callback_duplicate", "callback_concurrent", "callback_bad_signature", "callback_out_of_order"
)  # fmt: skip


@pytest.mark.parametrize("rate", CALLBACK_RATES)
def test_callback_rates_are_validated_and_leave_calls_alone(rate: str) -> None:
    with pytest.raises(ValueError, match=rate):
        Faults.from_dict({rate: 1.5})
    faults = Faults.from_env({f"INVOICE_SANDBOX_{rate.upper()}": "1"})
    assert getattr(faults, rate) == 1.0
    assert faults.outcome(0.0) == "ok"  # callback faults are no outcome of a call


def test_callback_faults_are_drawn_each_on_its_own() -> None:
    rng = random.Random(0)
    assert Faults().callback_faults(rng) == frozenset()
    assert not Faults().out_of_order(rng)
    every = Faults(callback_duplicate=1, callback_concurrent=1, callback_bad_signature=1)
    assert every.callback_faults(rng) == {"duplicate", "concurrent", "bad_signature"}
    assert Faults(callback_out_of_order=1).out_of_order(rng)
    # Every rate draws, so a seed replays the same sequence whatever the rates.
    half = Faults(callback_duplicate=0.5, callback_bad_signature=0.5)
    rng_a, rng_b = random.Random(4), random.Random(4)
    draws_a = [half.callback_faults(rng_a) for _ in range(50)]
    draws_b = [half.callback_faults(rng_b) for _ in range(50)]
    assert draws_a == draws_b
    assert {"duplicate", "bad_signature"} <= set().union(*draws_a)
