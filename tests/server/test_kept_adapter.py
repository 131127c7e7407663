"""Which round's global adapter a run keeps in <out>/adapter (server/app.py `kept_round`)."""

from __future__ import annotations

from fedward.server.app import kept_round


def _rows(*rounds: tuple[str, float | None]) -> list[dict]:
    return [
        {"round": number, "status": status, "global": {} if f1 is None else {"macro_f1": f1}}
        for number, (status, f1) in enumerate(rounds, start=1)
    ]


def test_the_best_round_is_kept_not_the_last():
    # the default run: macro-F1 0.454, 0.677, 0.609
    rows = _rows(("ok", 0.454), ("ok", 0.677), ("ok", 0.609))
    assert kept_round(rows, "macro_f1") == 2
    assert kept_round(rows, "macro_f1", "last") == 3


def test_a_tie_keeps_the_later_round_and_a_failed_round_is_never_kept():
    rows = _rows(("ok", 0.6), ("ok", 0.6), ("failed: too few", 0.9))
    assert kept_round(rows, "macro_f1") == 2


def test_without_any_score_the_last_round_is_kept():
    # every hospital refused to release its evaluation, or every round failed
    assert kept_round(_rows(("ok", None), ("ok", None)), "macro_f1") == 2
    assert kept_round(_rows(("failed: x", 0.5), ("failed: y", None)), "macro_f1") == 2
    assert kept_round([], "macro_f1") is None
