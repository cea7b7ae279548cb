"""The device daemon (DESIGN.md section 7). Not written yet."""
