"""The sub-commands of ``yolo-ota``, one module per family; ``yolo_ota.cli`` puts them together."""
