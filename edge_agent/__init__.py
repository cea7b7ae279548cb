"""The device daemon (DESIGN.md section 7). So far: its saved update state machine (``edge_agent.state``)."""
