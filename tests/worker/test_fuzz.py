"""Fuzzing in the suite: seeded hostile records through the worker's decoding and evaluation.

Every record gets a verdict or a dead letter, no exception escapes, no check fails for a reason
other than the documented ones (a policy raising on accepted input is counted, and denies), and
every record the worker would produce fits its topic. ``make fuzz`` runs 100,000 (bench/fuzz.py).
"""

from __future__ import annotations

from fuzzing import fuzz, records


def test_ten_thousand_fuzzed_records_are_each_answered_and_none_crashes():
    counts = fuzz(10_000, seed=11)
    assert counts.records == 10_000
    assert counts.crashes == 0, "\n".join(counts.crash_examples)
    # the corpus reaches every path: accepted batches, each kind of refusal, policy errors
    assert counts.accepted > 4000
    assert {"invalid", "not_json", "too_large"} <= set(counts.rejected_by_kind)
    assert counts.rejected_by_kind["invalid"] > 1000
    assert counts.engine_errors > 0
    assert counts.accepted + sum(counts.rejected_by_kind.values()) >= counts.records


def test_fuzzed_records_through_the_reference_engine_in_its_processes():
    # (invariant-ai computes a fan-out's every match: a 1 s budget stops those sooner)
    counts = fuzz(300, seed=12, engine="reference", budget_ms=1000)
    assert counts.crashes == 0, "\n".join(counts.crash_examples)
    assert counts.accepted > 120


def test_the_corpus_is_the_same_for_a_seed():
    assert list(records(300, seed=5)) == list(records(300, seed=5))
    assert list(records(50, seed=5)) != list(records(50, seed=6))
