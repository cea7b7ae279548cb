"""The REST API (DESIGN.md section 6) as one router per resource; ``app.create_app`` includes them.

- ``devices``: enrollment, the device poll (``/desired``), reports, and the operators' device views.
- ``rollouts``: creating, reading and controlling rollouts, and their telemetry windows.
- ``operations``: ``/healthz``, ``/metrics``, the dashboard's files, the audit log, promotions, MLflow's webhook.
- ``deps``: the typed dependencies the routes take (``ServiceDep``, ``CurrentOperator``, ``CurrentDevice``).
- ``problems``: the error answers, and the one handler that maps domain errors to status codes.

Routes authenticate, call the service layer (``Service``'s managers and ``queries``), and return its answer;
none opens a database session.
"""
