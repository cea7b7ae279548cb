"""``yolo-ota demo``: the whole loop on one machine, with real processes, real detectors and no accounts.

An MLflow server (SQLite, served artifacts), the rollout service (SQLite) and a small fleet of edge-agent
processes run on loopback. ``detectors`` trains a small YOLO on synthetic PCB scenes (once, then cached) and
derives two regressions from it, ``versions`` exports, gates and signs them, ``stack`` starts and stops the
processes, ``traffic`` posts held-out scenes to the agents, ``story`` tells the steps (``comparisons``: v2's
canary and the A/B test; ``regressions``: the two defences), ``tables`` and ``narration`` print them.
"""
