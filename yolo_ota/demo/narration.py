"""What the demo prints as it goes: timestamped lines, step titles, and claims checked against the REST API.

Every claim is kept with its verdict; the summary counts them and the exit status says whether all held.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from rich.console import Console
from rich.text import Text


@dataclass
class Claim:
    text: str
    held: bool
    detail: str = ""


@dataclass
class Narrator:
    console: Console
    claims: list[Claim] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def say(self, message: str) -> None:
        self.console.print(Text.assemble((f"[{self.elapsed_s():6.1f}s] ", "dim"), message))

    def step(self, title: str) -> None:
        self.console.rule(Text(title, style="bold"), align="left")

    def claim(self, text: str, held: bool, detail: str = "") -> bool:
        self.claims.append(Claim(text, held, detail))
        mark = ("✓ ", "green") if held else ("✗ ", "bold red")
        self.console.print(Text.assemble(mark, text, (f"  ({detail})" if detail else "", "dim")))
        return held
