"""Fleet analysis of a rollout: is the new version's telemetry worse than the old one's on the same fleet?

- ``spec``: what a rollout asks of the analysis (``AnalysisSpec``, ``ShadowSpec``) and the verdicts.
- ``stats``: one telemetry ``Window``; each metric measured on two arms of windows (the statistics, numpy/scipy).
- ``verdict``: ``analyse``, the canary verdict (pass / marginal / fail / inconclusive, with a score).
- ``ab``: ``compare_arms``, which arm of an A/B test is better.

Pure computation: the service loads the windows and passes them in.
"""
