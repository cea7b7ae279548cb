"""The registry side of yolo-ota (DESIGN.md sections 5 and 6).

- ``registry.mlflow_gateway``: the MLflow gateway, the only module that imports ``mlflow`` (register, versions,
  promote, webhooks); ``registry.tags`` the ``ota.*`` tags it writes; ``registry.errors`` its error tree.
- ``registry.resolver``: the light resolver (httpx only) from a model version to its manifest and file URLs;
  ``registry.s3`` presigned S3 URLs.
- ``registry.rollout_service``: the rollout service, a deployable of its own (``yolo-ota server``, the ``server``
  extra, its own container): devices, rollouts, waves, A/B arms and promotions over REST.
"""
