"""`fedward audit privacy`: an empirical lower bound on a hospital's epsilon, from outside.

Canaries go into one simulated hospital's training data, each with probability 1/2 (canaries.py);
after a federated run, how well the global models tell the included ones from the rest
(scoring.py) becomes a statistical lower bound on epsilon (bound.py, Steinke, Nasr and Jagielski
2023), printed beside the epsilon the accountant claims (audit.py, cli.py). Not to be confused
with common/audit_log.py, the coordinator's hash-chained log of what a run did.
"""
