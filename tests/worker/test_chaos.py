"""The short chaos run of ``make chaos`` (bench/chaos.py): 5,000 batches through 2-3 workers while
workers are killed, the broker restarts, a worker joins and one leaves; nothing may be lost,
contradicted or different from a replay, and under exactly-once nothing may be repeated.

It starts a broker of its own (it restarts it), so it runs whatever broker the session has.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from chaos import run_chaos  # noqa: E402


@pytest.mark.integration
@pytest.mark.parametrize("guarantee", ["exactly-once", "at-least-once"])
def test_short_chaos_loses_nothing_and_agrees_with_replay(guarantee, tmp_path):
    res = run_chaos(guarantee, batches=5000, sessions=500, kills=2, broker_restarts=1, rate=250,
                    seed=3, workdir=tmp_path, verbose=False)
    assert res.kills == 2 and res.broker_restarts == 1 and res.rebalances == 6, res.events
    assert res.expected_denies > 0
    assert res.missing == 0, res
    assert res.conflicting == 0, res
    assert res.wrong_decisions == 0, res
    assert res.live_vs_replay_diffs == 0, res
    assert res.worker_exits == 0, res
    if guarantee == "exactly-once":
        assert res.duplicates == 0, res
