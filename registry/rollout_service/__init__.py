"""The rollout service (``yolo-ota server``): ``app.create_app(settings)`` builds it; docs/rollout-service.md
maps its modules."""
