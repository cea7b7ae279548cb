"""``yolo-ota demo``: the whole loop on one machine, with real processes and no accounts.

An MLflow server (SQLite, served artifacts), the rollout service (SQLite) and a small fleet of edge-agent
processes run on loopback; the demo exports, gates, signs and registers versions, promotes them with the
``production`` alias, runs an A/B test, and rolls out a version that fails on the devices, printing what the
fleet does at each step. ``stack`` starts and stops the processes, ``versions`` builds the bundles, ``traffic``
keeps the agents busy, ``story`` tells the steps.
"""
