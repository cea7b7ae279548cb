"""Versions on the device's disk: a staging folder per offer, installed versions, and pruning.

Layout under the data dir::

    staging/<model>/<version>/      files of an offer being downloaded, verified and validated
    versions/<model>/<version>/     installed (validated) versions; the serving one and the last known good
                                    stay, the oldest beyond ``keep`` are pruned
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

from pydantic import BaseModel

from edge_agent.protocol import DesiredState
from edge_agent.variant_choice import VariantChoice
from exporters.files import atomic_write

log = logging.getLogger(__name__)

OFFER_FILE = "offer.json"
INSTALLED_FILE = "installed.json"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class Installed(BaseModel):
    """What is known of an installed version: where it came from and how it validated here."""

    model: str
    version: str
    key: str
    variant: str
    p99_ms: float | None = None
    installed_seq: int = 0
    validated_on: str | None = None  # the device's fingerprint summary when it validated here
    committed_here: bool = False  # it served here and passed its probation
    variant_choice: VariantChoice | None = None  # why ``variant`` and not the others (None: before formats)


def _name(text: str) -> str:
    cleaned = _UNSAFE.sub("_", text)
    return cleaned if cleaned.strip("._") else "_" + cleaned


class VersionStore:
    def __init__(self, data_dir: Path) -> None:
        self.staging_root = data_dir / "staging"
        self.versions_root = data_dir / "versions"

    def staging(self, model: str, version: str) -> Path:
        return self.staging_root / _name(model) / _name(version)

    def installed_dir(self, model: str, version: str) -> Path:
        return self.versions_root / _name(model) / _name(version)

    def save_offer(self, offer: DesiredState) -> Path:
        """Keep the offer beside its staged files, so a restart resumes the same download."""
        assert offer.model is not None and offer.version is not None
        staging = self.staging(offer.model, offer.version)
        staging.mkdir(parents=True, exist_ok=True)
        atomic_write(staging / OFFER_FILE, offer.model_dump_json(indent=2).encode())
        return staging

    def load_offer(self, model: str, version: str) -> DesiredState | None:
        path = self.staging(model, version) / OFFER_FILE
        return DesiredState.model_validate_json(path.read_bytes()) if path.is_file() else None

    def installed(self, model: str, version: str) -> Installed | None:
        path = self.installed_dir(model, version) / INSTALLED_FILE
        return Installed.model_validate_json(path.read_bytes()) if path.is_file() else None

    def seed_staging(self, model: str, version: str, key: str) -> bool:
        """Stage an offer from an installed copy of the same bundle (a rollback needs no download)."""
        installed = self.installed(model, version)
        if installed is None or installed.key != key:
            return False
        source, staging = self.installed_dir(model, version), self.staging(model, version)
        for path in source.rglob("*"):
            if path.is_file() and path.name != INSTALLED_FILE:
                target = staging / path.relative_to(source)
                target.parent.mkdir(parents=True, exist_ok=True)
                if not target.exists():
                    shutil.copy2(path, target)
        log.info("staged %s v%s from the installed copy", model, version)
        return True

    def install(self, model: str, version: str, record: Installed) -> Path:
        """Move the validated staging folder into place (one rename) and record it."""
        staging, target = self.staging(model, version), self.installed_dir(model, version)
        seq = 1 + max((i.installed_seq for i in self.all_installed()), default=0)
        if staging.is_dir():
            if target.exists():
                shutil.rmtree(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging, target)
            (target / OFFER_FILE).unlink(missing_ok=True)
        atomic_write(
            target / INSTALLED_FILE, record.model_copy(update={"installed_seq": seq}).model_dump_json().encode()
        )
        return target

    def mark_committed(self, model: str, version: str) -> None:
        """Record that ``version`` served here and passed its probation."""
        record = self.installed(model, version)
        if record is not None and not record.committed_here:
            path = self.installed_dir(model, version) / INSTALLED_FILE
            atomic_write(path, record.model_copy(update={"committed_here": True}).model_dump_json().encode())

    def all_installed(self) -> list[Installed]:
        found = []
        for path in self.versions_root.glob(f"*/*/{INSTALLED_FILE}"):
            try:
                found.append(Installed.model_validate_json(path.read_bytes()))
            except ValueError:
                log.warning("ignoring unreadable %s", path)
        return sorted(found, key=lambda i: i.installed_seq)

    def discard_staging(self, model: str, version: str) -> None:
        shutil.rmtree(self.staging(model, version), ignore_errors=True)

    def prune(self, keep: int, protect: set[tuple[str, str]]) -> list[str]:
        """Remove the oldest installed versions beyond ``keep``, never one in ``protect``; also stale staging."""
        installed = self.all_installed()
        removable = [i for i in installed if (i.model, i.version) not in protect]
        excess = max(0, len(installed) - keep)
        removed = []
        for record in removable[:excess]:
            shutil.rmtree(self.installed_dir(record.model, record.version), ignore_errors=True)
            removed.append(f"{record.model} v{record.version}")
        if removed:
            log.info("pruned %s (keeping %d versions)", ", ".join(removed), keep)
        return removed
