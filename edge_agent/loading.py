"""Loading installed versions for serving, with the fallbacks: when the chosen variant fails to load, the next in
``edge_agent.variant_choice.fallback_chain`` (AOTInductor -> TorchScript -> ``cpu-fp32``); when a CUDA model
fails at run time, the same chain after it. Each fallback is reported (reason ``fallback:``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from edge_agent.journal import Journal
from edge_agent.runtime import DEFAULT_SERVING, LoadedModel, ServingOptions, load_model
from edge_agent.store import VersionStore
from edge_agent.variant_choice import CPU_VARIANT, fallback_chain
from exporters.bundle import Manifest, read_manifest
from exporters.errors import ExportError, one_line
from exporters.formats import all_variants

log = logging.getLogger(__name__)


def _on_disk(directory: Path, manifest: Manifest) -> set[str]:
    """The variants whose files this device downloaded (it fetches only those it can run)."""
    return {name for name, v in all_variants(directory, manifest).items() if (directory / v.path).is_file()}


class ModelLoader:
    """Loads what ``store`` has installed onto this device's ``device`` setting."""

    def __init__(
        self, store: VersionStore, journal: Journal, device: Literal["auto", "cuda", "cpu"],
        options: ServingOptions = DEFAULT_SERVING,
    ) -> None:  # fmt: skip
        self._store = store
        self._journal = journal
        self._device = device
        self._options = options

    def load_installed(self, model: str, version: str) -> LoadedModel:
        """Load an installed version in the variant it validated with (``cpu-fp32`` when CUDA is switched off)."""
        directory = self._store.installed_dir(model, version)
        record = self._store.installed(model, version)
        manifest = read_manifest(directory)
        variant = record.variant if record else CPU_VARIANT
        if self._device == "cpu" and variant.startswith("cuda"):
            self._journal.emit(self._journal.state.state.value, model, version, None,
                               reason=f"fallback: running {CPU_VARIANT} instead of {variant}: CUDA is switched off "
                               "by settings")  # fmt: skip
            variant = CPU_VARIANT
        return self.load_with_fallback(directory, manifest, variant, model, version)

    def load_with_fallback(
        self, directory: Path, manifest: Manifest, variant: str, model: str, version: str
    ) -> LoadedModel:
        """Load ``variant``; when it fails, the next variant of its fallback chain that is on disk."""
        chain = fallback_chain(variant, _on_disk(directory, manifest)) or [variant]
        for position, name in enumerate(chain):
            try:
                return load_model(directory, manifest, name, model=model, version=version, options=self._options)
            except (ExportError, RuntimeError) as exc:
                if position == len(chain) - 1:
                    raise
                following = chain[position + 1]
                log.warning("%s failed to load (%s): falling back to %s", name, one_line(exc), following)
                why = f"fallback: {name} failed to load, serving {following}: {one_line(exc, 200)}"
                st = self._journal.state
                self._journal.emit(st.state.value, model, version, st.target_rollout_id, reason=why)
        raise AssertionError("unreachable: the chain is never empty")

    def run_time_fallback(self, failed: LoadedModel) -> LoadedModel | None:
        """Called by the runtime after a variant failed at run time: serve the next variant of the same version
        in its fallback chain (AOTInductor -> TorchScript -> ``cpu-fp32``), or None when there is none."""
        directory, manifest = failed.directory, failed.manifest
        chain = fallback_chain(failed.variant, _on_disk(directory, manifest))[1:]
        if not chain:
            return None
        try:
            replacement = self.load_with_fallback(directory, manifest, chain[0], failed.model, failed.version)
        except (ExportError, RuntimeError) as exc:
            log.error("the fallback for %s failed too: %s", failed.label, one_line(exc))
            return None
        self._journal.emit(self._journal.state.state.value, failed.model, failed.version, None,
                           reason=f"fallback: {failed.variant} failed at run time, serving "
                           f"{replacement.variant}")  # fmt: skip
        return replacement
