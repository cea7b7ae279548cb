"""The edge agent: pulls, verifies and validates model versions on a device, hot-swaps them and serves detections.

In-process use::

    from edge_agent import Agent, AgentSettings

    agent = Agent(AgentSettings(server=..., device_id=..., data_dir=..., enrollment_token=..., listen=None)).start()
    result = agent.detect(jpeg_bytes)   # DetectResult: detections and the version that answered
    agent.stop()
"""

from edge_agent.agent import Agent
from edge_agent.errors import AgentError
from edge_agent.runtime import DetectResult
from edge_agent.settings import AgentSettings, load_settings

__all__ = ["Agent", "AgentError", "AgentSettings", "DetectResult", "load_settings"]
