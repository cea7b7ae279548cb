"""The ``yolo-ota`` command line (``yolo_ota.cli``)."""
