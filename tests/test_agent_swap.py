"""Swap under load: a client sends detect requests back to back while new versions are rolled out and swapped
in, and back again; not one request fails, and answers move from one version to the next."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path

import httpx
import pytest
from agent_stack import AgentStack, lane_agent

pytestmark = pytest.mark.slow  # swaps under load


def test_swaps_under_load_fail_no_request(agent_stack: AgentStack, tmp_path: Path, bus_jpg: bytes) -> None:
    stack = agent_stack
    agent = lane_agent(stack, tmp_path, "swap")
    stop = threading.Event()
    answers: dict[int, list[tuple[int, str | None]]] = {0: [], 1: []}
    errors: list[str] = []

    def client(index: int) -> None:
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                try:
                    response = http.post(agent.url + "/v1/detect", content=bus_jpg)
                    answers[index].append((response.status_code, response.json().get("version")))
                except httpx.HTTPError as exc:  # a dropped connection counts as a failed request
                    errors.append(repr(exc))

    clients = [threading.Thread(target=client, args=(index,)) for index in answers]
    for thread in clients:
        thread.start()
    try:
        for role in ("good2", "good1", "good2"):
            stack.roll_out("swap", role)
            agent.wait_serving(stack.versions[role])
    finally:
        stop.set()
        for thread in clients:
            thread.join()
        agent.stop()
    assert not errors, errors[:3]
    good1, good2 = stack.versions["good1"], stack.versions["good2"]
    for sequence in answers.values():
        failed = [a for a in sequence if a[0] != 200]
        assert not failed, failed[:3]
        # Each client's next request starts after its last answer, so it sees every swap exactly once.
        versions = [version for _, version in sequence]
        changes = [b for a, b in itertools.pairwise(versions) if a != b]
        assert len(sequence) > 20 and versions[0] == good1 and changes == [good2, good1, good2], changes
