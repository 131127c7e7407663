"""A real hospital's safeguards around every training request: site policy, privacy ledger, audit.

The deployed ClientApp (`client.app:app`) opens a `Site` from its node config, which
`fedward client start` writes (the keys: client/site/node.py).

A train request goes through three gates (`client.app.handle_train`):

1. `admit`, before any record is read: the run id from the coordinator must be a plain
   identifier (it is used in file names), the round must lie in 1..rounds, the site policy
   judges the run spec alone (its models, tasks, budget, rounds and the hospital's declared
   labels), and the run's spec is fixed: the first spec this data set accepts for a run id is
   kept with the hospital's run state (`<ledger>/runs/`), and a later message for that run with
   another spec is refused (`run.spec_changed`), so a coordinator cannot ask the same run with
   fewer rounds. If this data set already released an update for this (run, round) -- a
   resumed run repeating the round it was interrupted in -- the very same update is sent again
   ("replay"): nothing is trained, so nothing more is spent, and the ledger keeps one entry for
   the round. Any other repeat, and a round below one this run already trained, is refused.
2. `check_budget`, once the data is read and before any check that depends on it: the ledger
   reserves this round's planned DP steps if the run's target epsilon fits what the lifetime
   budget has left (one locked step, so two concurrent requests cannot both pass). Only then
   are the data-dependent checks made -- the policy's minimum example count here, the
   vocabulary and the labels in client/app.py -- and a refusal from any of them keeps the
   reservation: it is charged as a trained round.
3. `record`, after training and before anything leaves: the reservation is confirmed as spent
   (written atomically), the released update kept for a replay, and an audit record written.

Why this order (issue 28). A refusal is a reply the coordinator reads without noise. If it
depended on the records and came before the budget gate, a coordinator could ask as often as it
liked, for free: "does any record carry the label HIV-positive?" (labels [cardiac, HIV-positive]
against [cardiac, zzz-decoy]), "are there more than N training records?" (a crafted
secagg_max_weight, sixteen requests for the exact count). So: a refusal carries no number
derived from the data; what the hospital can judge from its own policy (including its declared
`labels`) is judged in gate 1, before any data is read; and whatever depends on the data comes
after the budget gate and is paid for. A secure-aggregation weight above the run's
`secagg_max_weight` is not refused at all: the weight is capped at it (client/app.py).

A refusal at any gate becomes a refusal reply (never a crash) and an audit record. A process
that dies after gate 2 leaves the reservation in the ledger, where it counts as spent. What goes
to the coordinator is the error's reason code with numbers (common/protocol/reasons.py), never its
text: a path, a column or a record's value is described in this hospital's log and audit log only.

An evaluate request is a release too (`admit_evaluation`, `release_evaluation`): refused unless
the policy allows it, for a round this data set trained in (or the final one), once a round, and
within the budget, all before any record is read; the release is charged to the ledger before
the data is read (a refusal after that keeps the charge), and its metrics are noised counts
(client/privacy/release.py). Round 0 is an evaluate-only run's one evaluation: the pinned
starting adapter alone, where the policy has `evaluate_starting_adapter`, charged the same, once
a run; that run then trains nothing here (`run.evaluate_only`).

One module per job; `gates` imports the others and none of them imports `gates` or one another,
so the folder has no circle:

    gates.py       `Site`: the gates, in their order (the one place that order is written)
    node.py        the node config -> Site's settings
    pins.py        the policy's pins: model, starting adapter, the spec fixed on first contact
    budget.py      the data set's ledger, opened under its id; a run's accountant history
    releases.py    the kept update of a paid round, and when it may be sent again
    evaluation.py  an evaluation's refusals, its charge and its noised metrics
    audit.py       the audit records of releases and refusals
"""

from fedward.client.site.evaluation import EVALUATION_KEY, START_EVALUATION_KEY, START_ROUND
from fedward.client.site.gates import Site
from fedward.client.site.node import SCHEMA_KEYS
from fedward.client.site.pins import RUNS, check_starting_arrays
from fedward.client.site.releases import RELEASES, Release

__all__ = [
    "EVALUATION_KEY",
    "RELEASES",
    "RUNS",
    "SCHEMA_KEYS",
    "START_EVALUATION_KEY",
    "START_ROUND",
    "Release",
    "Site",
    "check_starting_arrays",
]
