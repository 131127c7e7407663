"""A hospital's privacy accounting: what each DP release costs and what is left.

`accounting` calibrates the noise and composes epsilon over an accountant history (the round's
plan), `ledger` records every release made from one local data set over all runs and refuses
one that would go past the site's lifetime budget, `release` noises the evaluation counts a
hospital may send, and `dp_adam` is the DP-aware Adam the run spec may choose.
"""
