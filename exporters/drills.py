"""Fault drills for bundles: builds that pass their gates at export but misbehave on a device.

Edge devices re-run the gates before they swap a bundle in, and watch it once it serves. To show (in
``yolo-ota demo``) and to test that they refuse or roll back a bad one, one needs bundles that are internally
consistent (every digest matches, so ``load_verified`` passes) yet wrong in one chosen way: a model that drifts,
turns to NaN or raises after a number of calls, a slower model, a tighter latency budget, a newer exporting
torch, a missing or foreign signature, another product line, an older release. Nothing here is used on the
normal export path.

``manifest.gates`` and ``gates_passed`` are never touched: the point is a bundle that *passed* at export. Every
function rewrites ``manifest.json`` through ``exporters.bundle.write_manifest`` so its bytes stay canonical (what
``sign_bundle`` signs), and every change to the manifest drops ``manifest.sig``, which no longer matches it; call
``sign`` again to get a signed faulty bundle.

The model wrappers are scripted modules around the variant's traced module; they take and return what the
variant does (float32 (B, 3, H, W) in, (B, 4+nc, A) out), so the gate code runs them unchanged.
"""

# No ``from __future__ import annotations`` here: TorchScript reads the wrappers' class-level annotations at
# runtime and cannot resolve them as strings (it fails with "Unknown type annotation: '_Detector'").
import io
import warnings
import zipfile
from pathlib import Path

import torch

from exporters.bundle import SIGNATURE_NAME, file_entry, read_manifest, safe_join, write_manifest
from exporters.files import atomic_write
from exporters.formats import FORMATS_NAME, all_variants, read_index, write_index
from exporters.runtime import load_torchscript, quiet_torchscript
from exporters.signing import load_private_key, sign_bundle

__all__ = [
    "load_variant",
    "nan_after",
    "raise_after",
    "replace_variant",
    "set_export_torch",
    "set_latency_budget",
    "set_product_line",
    "set_release",
    "shifted",
    "sign",
    "slowed",
    "unsign",
]


class _Detector(torch.nn.Module):
    """What the wrappers need of the wrapped variant. An interface type (rather than the traced module's own
    class, which a module loaded from a file does not have in Python) lets ``_FailAfter`` name it in the
    annotations of ``__getstate__``/``__setstate__``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[empty-body]
        pass  # TorchScript insists on ``pass`` in an interface; it reads only the signature


with warnings.catch_warnings():  # torch 2.x marks torch.jit.interface deprecated; it still is what works here
    warnings.simplefilter("ignore", FutureWarning)
    _Detector = torch.jit.interface(_Detector)  # type: ignore[misc]


class _FailAfter(torch.nn.Module):
    """Forwards to ``inner`` for ``limit`` calls, then returns NaN outputs or raises on every later call.

    The call counter is deliberately left out of the saved state: ``__setstate__`` (which ``torch.jit.load``
    runs) starts it at 0, so each process that loads the file counts its own calls, whether or not this
    in-memory wrapper was called before it was saved.
    """

    inner: _Detector
    limit: int
    calls: int
    raise_error: bool

    def __init__(self, inner: torch.jit.ScriptModule, limit: int, *, raise_error: bool) -> None:
        super().__init__()
        self.inner = inner  # type: ignore[assignment]  # any module with this forward satisfies the interface
        self.limit = limit
        self.calls = 0
        self.raise_error = raise_error

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        y = self.inner(x)
        if self.calls > self.limit:
            if self.raise_error:
                # Not ``raise RuntimeError(...)``: TorchScript's raise reaches Python as ``torch.jit.Error``, which
                # is not a RuntimeError, so handlers written for real runtime failures (an ATen error, CUDA out of
                # memory) would miss it. A failing ATen check raises a genuine RuntimeError carrying our message;
                # its result is used below so that dead-code elimination keeps it.
                token = torch.ops.aten._functional_assert_async(
                    torch.tensor(False), f"injected failure after {self.limit} calls", torch.empty(0)
                )
                return y + token.sum()  # never reached: the check above always fails
            # multiplied rather than replaced, so shape, dtype and device stay exactly the inner output's
            return y * float("nan")
        return y

    @torch.jit.export
    def __getstate__(self) -> tuple[_Detector, int, bool, bool]:
        return (self.inner, self.limit, self.raise_error, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[_Detector, int, bool, bool]) -> None:
        self.inner = state[0]
        self.limit = state[1]
        self.raise_error = state[2]
        self.training = state[3]
        self.calls = 0


class _Shifted(torch.nn.Module):
    """Adds ``px`` to the box centres (rows 0 and 1 of the output), leaving sizes and scores as they are."""

    px: float

    def __init__(self, inner: torch.jit.ScriptModule, px: float) -> None:
        super().__init__()
        self.inner = inner
        self.px = px

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        # out of place: the gates run under inference_mode, and the traced output must not be altered in place
        return torch.cat([y[:, :2] + self.px, y[:, 2:]], dim=1)


class _Slowed(torch.nn.Module):
    """Runs ``inner`` ``repeats`` times and returns the last output: identical results, ``repeats`` times the work."""

    repeats: int

    def __init__(self, inner: torch.jit.ScriptModule, repeats: int) -> None:
        super().__init__()
        self.inner = inner
        self.repeats = repeats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        # each result feeds the loop's output, so TorchScript's dead-code elimination cannot drop the extra runs
        for _ in range(self.repeats - 1):
            y = self.inner(x)
        return y


def _script(module: torch.nn.Module) -> torch.jit.ScriptModule:
    with quiet_torchscript():
        scripted: torch.jit.ScriptModule = torch.jit.script(module)
    return scripted.eval()


def _drop_signature(bundle_dir: Path) -> None:
    # a signature over the previous manifest bytes: stale, and a device would rightly refuse it as altered
    (bundle_dir / SIGNATURE_NAME).unlink(missing_ok=True)


def _extra_files(path: Path) -> dict[str, bytes]:
    """The extra files of a TorchScript archive (``<archive>/extra/<name>``), read without loading the model."""
    extras: dict[str, bytes] = {}
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            parts = name.split("/")
            if len(parts) == 3 and parts[1] == "extra" and parts[2]:
                extras[parts[2]] = archive.read(name)
    return extras


def replace_variant(bundle_dir: Path, module: torch.jit.ScriptModule, *, variant: str = "cpu-fp32") -> None:
    """Save ``module`` over the variant's TorchScript file and re-digest it in the manifest (drops the signature).

    The old file's extra files (Ultralytics' ``config.txt``, the embedded fingerprint) are carried over, so the
    new file differs from the exported one only in its model.
    """
    manifest = read_manifest(bundle_dir)
    if variant not in manifest.variants:
        raise KeyError(f"bundle has no variant {variant}; it has {', '.join(sorted(manifest.variants))}")
    relative = manifest.variants[variant].path
    path = safe_join(bundle_dir, relative)
    extras = _extra_files(path) if path.is_file() else {}
    _drop_signature(bundle_dir)
    buffer = io.BytesIO()
    with quiet_torchscript():
        torch.jit.save(module, buffer, _extra_files=extras)
    atomic_write(path, buffer.getvalue())
    manifest.files[relative] = file_entry(path)
    write_manifest(bundle_dir, manifest)


def load_variant(bundle_dir: Path, variant: str = "cpu-fp32") -> torch.jit.ScriptModule:
    """Load a bundle's variant on the CPU, as the gate code does (no digest check: see ``load_verified``)."""
    manifest = read_manifest(bundle_dir)
    return load_torchscript(safe_join(bundle_dir, manifest.variants[variant].path), "cpu")


def nan_after(inner: torch.jit.ScriptModule, calls: int) -> torch.jit.ScriptModule:
    """A wrapper whose outputs turn to NaN from call ``calls + 1`` on, counted per loaded instance."""
    if calls < 0:
        raise ValueError(f"calls must be >= 0, not {calls}")
    return _script(_FailAfter(inner, calls, raise_error=False))


def raise_after(inner: torch.jit.ScriptModule, calls: int) -> torch.jit.ScriptModule:
    """A wrapper that raises ``RuntimeError("injected failure after N calls")`` from call ``calls + 1`` on.

    The error is a genuine ``RuntimeError`` (not ``torch.jit.Error``, see ``_FailAfter.forward``); its message
    also holds the TorchScript traceback.
    """
    if calls < 0:
        raise ValueError(f"calls must be >= 0, not {calls}")
    return _script(_FailAfter(inner, calls, raise_error=True))


def shifted(inner: torch.jit.ScriptModule, px: float) -> torch.jit.ScriptModule:
    """A wrapper that moves every box centre by ``px`` input pixels in x and y: detection parity must fail."""
    return _script(_Shifted(inner, float(px)))


def slowed(inner: torch.jit.ScriptModule, repeats: int) -> torch.jit.ScriptModule:
    """A wrapper with the same outputs as ``inner`` that does ``repeats`` times its work."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, not {repeats}")
    return _script(_Slowed(inner, repeats))


def set_latency_budget(bundle_dir: Path, budget_ms: float | None) -> None:
    """Rewrite ``manifest.latency_budget_ms`` (the budget devices gate against by default); drops the signature."""
    manifest = read_manifest(bundle_dir)
    _drop_signature(bundle_dir)
    write_manifest(bundle_dir, manifest.model_copy(update={"latency_budget_ms": budget_ms}))


def set_product_line(bundle_dir: Path, name: str) -> None:
    """Rewrite the product line the bundle is for (``manifest.name``: registering it is allowed under that name
    only, and devices refuse it as another line's bundle); drops the signature."""
    manifest = read_manifest(bundle_dir)
    _drop_signature(bundle_dir)
    write_manifest(bundle_dir, manifest.model_copy(update={"name": name}))


def set_release(bundle_dir: Path, release: int | None) -> None:
    """Rewrite the bundle's release number (an older one is a downgrade on a device running a newer); drops the
    signature."""
    manifest = read_manifest(bundle_dir)
    _drop_signature(bundle_dir)
    write_manifest(bundle_dir, manifest.model_copy(update={"release": release}))


def set_export_torch(bundle_dir: Path, torch_version: str) -> None:
    """Rewrite the torch version the bundle claims it was exported with; drops the signature.

    Only the manifest's fingerprint changes (that is what ``check_compatible`` reads); the copy embedded in the
    TorchScript file is left alone. The text is not validated, so malformed versions can be injected too.
    """
    manifest = read_manifest(bundle_dir)
    # Fingerprint is a frozen model: copy it rather than assign to it
    fingerprint = manifest.fingerprint.model_copy(update={"torch": torch_version})
    _drop_signature(bundle_dir)
    write_manifest(bundle_dir, manifest.model_copy(update={"fingerprint": fingerprint}))


def set_variant_compatibility(bundle_dir: Path, variant: str, **changes: object) -> None:
    """Rewrite what ``formats.json`` says a variant needs (e.g. ``torch="2.0.0"``: an AOTInductor package for
    another torch release); re-digests ``formats.json`` and drops the signature."""
    manifest = read_manifest(bundle_dir)
    index = read_index(bundle_dir, manifest)
    if variant not in index.variants:
        raise KeyError(f"formats.json has no variant {variant}; it has {', '.join(sorted(index.variants))}")
    entry = index.variants[variant]
    compatibility = entry.compatibility.model_copy(update=changes)
    index.variants[variant] = entry.model_copy(update={"compatibility": compatibility})
    _drop_signature(bundle_dir)
    write_index(bundle_dir, index)
    manifest.files[FORMATS_NAME] = file_entry(bundle_dir / FORMATS_NAME)
    write_manifest(bundle_dir, manifest)


def replace_variant_file(bundle_dir: Path, variant: str, data: bytes) -> None:
    """Write ``data`` over any variant's file (of any format) and re-digest it: a file that verifies but does
    not load, for the fallbacks. Drops the signature."""
    manifest = read_manifest(bundle_dir)
    spec = all_variants(bundle_dir, manifest)[variant]
    path = safe_join(bundle_dir, spec.path)
    _drop_signature(bundle_dir)
    atomic_write(path, data)
    manifest.files[spec.path] = file_entry(path)
    write_manifest(bundle_dir, manifest)


def sign(bundle_dir: Path, signing_key: Path) -> None:
    """Sign the bundle's manifest as it is now with the PEM private key at ``signing_key``."""
    sign_bundle(bundle_dir, load_private_key(signing_key))


def unsign(bundle_dir: Path) -> None:
    """Remove ``manifest.sig`` (no error when the bundle is already unsigned)."""
    _drop_signature(bundle_dir)
