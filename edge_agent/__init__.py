"""The edge agent: pulls, verifies and validates model versions on a device, hot-swaps them and serves detections.

In-process use::

    from edge_agent import Agent, AgentSettings

    agent = Agent(AgentSettings(server=..., device_id=..., data_dir=..., enrollment_token=..., listen=None)).start()
    result = agent.detect(jpeg_bytes)   # DetectResult: detections and the version that answered
    agent.stop()
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edge_agent.agent import Agent
    from edge_agent.errors import AgentError
    from edge_agent.runtime import DetectResult
    from edge_agent.settings import AgentSettings, load_settings

__all__ = ["Agent", "AgentError", "AgentSettings", "DetectResult", "load_settings"]

# Imported on first use, so that light modules (edge_agent.state, edge_agent.protocol) load without torch.
_HOMES = {
    "Agent": "edge_agent.agent",
    "AgentError": "edge_agent.errors",
    "DetectResult": "edge_agent.runtime",
    "AgentSettings": "edge_agent.settings",
    "load_settings": "edge_agent.settings",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'edge_agent' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
