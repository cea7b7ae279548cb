"""Making and checking bundles: TorchScript export of Ultralytics detectors, gates, fingerprint, bundle format.

Only ``exporters.yolo`` and ``exporters.export`` need Ultralytics; ``bundle``, ``gates``, ``golden``,
``fingerprint``, ``postprocess``, ``preprocess``, ``runtime`` and ``local_gate`` need only torch, numpy and
pydantic, so a device can verify and gate a bundle without Ultralytics installed.
"""
