"""Headless Chromium for the tests: Debian's ``/usr/bin/chromium`` run as a plain command, once per look.

``--dump-dom`` gives the page's DOM after its scripts ran (``--virtual-time-budget`` runs its timers and waits for
its fetches), ``--screenshot`` a picture. ``.ci/run`` installs Chromium; tests that need it are marked
``needs_chromium`` and skip without it.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
# Without the background-networking flags Chromium's own connections are refused on a closed network and slow it.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--disable-quic",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)
VIRTUAL_TIME_MS = 10_000  # three refreshes of the page's clock; fetches hold virtual time until they answer
needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is not installed (.ci/run installs it)")


# -- a small DOM, from Chromium's --dump-dom ---------------------------------------------------------------------


class Element:
    def __init__(self, tag: str, attrs: dict[str, str], parent: Element | None) -> None:
        self.tag, self.attrs, self.parent = tag, attrs, parent
        self.children: list[Element | str] = []

    def text(self) -> str:
        """The text inside, whitespace collapsed."""
        parts = [c if isinstance(c, str) else c.text() for c in self.children]
        return " ".join("".join(parts).split())

    def iter(self) -> Iterator[Element]:
        for child in self.children:
            if isinstance(child, Element):
                yield child
                yield from child.iter()

    def find_all(self, tag: str | None = None, class_: str | None = None, **attrs: str | None) -> list[Element]:
        """Descendants by tag, class and attributes (``data_arm="x"`` is ``data-arm="x"``; None: any value)."""
        wanted = {name.replace("_", "-"): value for name, value in attrs.items()}
        return [
            e
            for e in self.iter()
            if (tag is None or e.tag == tag)
            and (class_ is None or e.has_class(class_))
            and all(n in e.attrs and (v is None or e.attrs[n] == v) for n, v in wanted.items())
        ]

    def one(self, tag: str | None = None, class_: str | None = None, **attrs: str | None) -> Element:
        found = self.find_all(tag, class_, **attrs)
        assert len(found) == 1, f"{len(found)} <{tag or '*'} .{class_} {attrs}> elements, expected one"
        return found[0]

    def has_class(self, name: str) -> bool:
        return name in self.attrs.get("class", "").split()


_VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"})


class _TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Element("#document", {}, None)
        self._current = self.root

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = Element(tag, {k: v or "" for k, v in attrs}, self._current)
        self._current.children.append(element)
        if tag not in _VOID:
            self._current = element

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._current.children.append(Element(tag, {k: v or "" for k, v in attrs}, self._current))

    def handle_endtag(self, tag: str) -> None:
        node: Element | None = self._current
        while node is not None and node is not self.root and node.tag != tag:
            node = node.parent
        if node is not None and node is not self.root and node.parent is not None:
            self._current = node.parent

    def handle_data(self, data: str) -> None:
        self._current.children.append(data)


def parse(markup: str) -> Element:
    builder = _TreeBuilder()
    builder.feed(markup)
    builder.close()
    return builder.root


# -- Chromium ----------------------------------------------------------------------------------------------------


def chromium(profile_root: Path, url: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    """One headless Chromium run with a fresh profile, as root-safe as a CI container needs."""
    profile = tempfile.mkdtemp(prefix="chromium-", dir=profile_root)
    try:
        done = subprocess.run(
            [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, url],
            capture_output=True,
            timeout=120,
        )
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    return done


def load(profile_root: Path, url: str, *, until: str | None = None, attempts: int = 3) -> Element:
    """The page's DOM after its scripts ran; with ``until``, taken again until <body data-state> is that."""
    for _ in range(attempts):
        done = chromium(profile_root, url, "--dump-dom", f"--virtual-time-budget={VIRTUAL_TIME_MS}")
        dom = parse(done.stdout.decode())
        state = dom.one("body").attrs.get("data-state")
        if until is None or state == until:
            return dom
    raise AssertionError(f"the page stayed {state!r}, never {until!r}:\n{done.stdout.decode()[-3000:]}")
