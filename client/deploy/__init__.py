"""A hospital's deployment: `fedward client start` and what runs under it.

`supernode` starts Flower's SuperNode with fedward's node config, `runtime` runs the hospital's
own ClientApp processes (only fedward's installed code touches the data), `bundle` checks that a
submitted Flower app bundle carries no code, and `node_config` is the contract between them.
"""
