"""Loading installed versions for serving, with the fallbacks to the ``cpu-fp32`` variant: when the chosen
variant fails to load, and when a CUDA model fails at run time. Each fallback is reported (reason ``fallback:``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from edge_agent.journal import Journal
from edge_agent.runtime import LoadedModel, load_model
from edge_agent.store import VersionStore
from edge_agent.verify import CPU_VARIANT, variant_to_load
from exporters.bundle import Manifest, read_manifest
from exporters.errors import ExportError, one_line

log = logging.getLogger(__name__)


class ModelLoader:
    """Loads what ``store`` has installed onto this device's ``device`` setting."""

    def __init__(self, store: VersionStore, journal: Journal, device: Literal["auto", "cuda", "cpu"]) -> None:
        self._store = store
        self._journal = journal
        self._device = device

    def load_installed(self, model: str, version: str) -> LoadedModel:
        """Load an installed version in the variant it validated with (or the one that can run here now)."""
        directory = self._store.installed_dir(model, version)
        record = self._store.installed(model, version)
        manifest = read_manifest(directory)
        staged = set(manifest.files)
        variant, note = variant_to_load(manifest, staged, record.variant if record else None, self._device)
        if note:
            self._journal.emit(self._journal.state.state.value, model, version, None, reason=f"fallback: {note}")
        return self.load_with_fallback(directory, manifest, variant, model, version)

    def load_with_fallback(
        self, directory: Path, manifest: Manifest, variant: str, model: str, version: str
    ) -> LoadedModel:
        """Load ``variant``; when it fails and is not ``cpu-fp32``, load ``cpu-fp32`` instead."""
        try:
            return load_model(directory, manifest, variant, model=model, version=version)
        except (ExportError, RuntimeError) as exc:
            if variant == CPU_VARIANT or CPU_VARIANT not in manifest.variants:
                raise
            log.warning("%s failed to load (%s): falling back to %s", variant, one_line(exc), CPU_VARIANT)
            why = f"fallback: {variant} failed to load, serving {CPU_VARIANT}: {one_line(exc, 200)}"
            st = self._journal.state
            self._journal.emit(st.state.value, model, version, st.target_rollout_id, reason=why)
            return load_model(directory, manifest, CPU_VARIANT, model=model, version=version)

    def cpu_fallback(self, failed: LoadedModel) -> LoadedModel | None:
        """Called by the runtime after a CUDA failure at run time: serve the same version's CPU variant."""
        if CPU_VARIANT not in failed.manifest.variants:
            return None
        try:
            replacement = load_model(
                failed.directory, failed.manifest, CPU_VARIANT, model=failed.model, version=failed.version
            )
        except (ExportError, RuntimeError) as exc:
            log.error("CPU fallback for %s failed too: %s", failed.label, one_line(exc))
            return None
        self._journal.emit(self._journal.state.state.value, failed.model, failed.version, None,
                           reason=f"fallback: {failed.variant} failed at run time, serving {CPU_VARIANT}")  # fmt: skip
        return replacement
