"""`fedward dashboard`: a read-only web page over the coordinator's output folders.

It shows what the coordinator already holds (history.json, audit.jsonl, checkpoint.npz, and
optionally the SuperLink's state database): nothing new leaves a hospital for it. Reading is
split by job: `runs.py` finds run folders and reads each one (a half-written or missing file is
a message on the page, never an exception), `hospitals.py` sums up each hospital's state,
`nodes.py` reads the registered SuperNodes, `plots.py` draws the charts (matplotlib, SVG), and
`app.py` serves the pages (Starlette + Jinja2, server-side rendering, no JavaScript).
"""
