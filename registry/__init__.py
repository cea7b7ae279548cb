"""The MLflow gateway and the rollout service (DESIGN.md sections 5 and 6). Not written yet."""
