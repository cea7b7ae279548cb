"""The bundle: one model version's directory, its manifest, and the checks that make it trustworthy.

Layout (DESIGN.md section 2)::

    manifest.json                          this module's ``Manifest``
    manifest.sig                           ed25519 signature over manifest.json's bytes (absent = unsigned)
    variants/<variant>/model.torchscript   one TorchScript file per device/precision variant
    variants/<variant>/model.pt2|.onnx     the other formats' variants (``exporters.formats``)
    formats.json                           those variants, their compatibility and gates (schema 3)
    golden.npz                             golden inputs, eager outputs and reference detections

Every file listed in ``Manifest.files`` is checked by size and sha256 before use; files not listed are ignored;
a listed path that would leave the bundle directory is refused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from exporters.errors import BundleIntegrityError, ManifestError, UnsafePathError
from exporters.files import atomic_write
from exporters.fingerprint import Fingerprint
from exporters.gate_report import GateThresholds, VariantGates

# 2: ``release``, the number that binds a bundle's place in its product line's history (signed with it)
# 3: ``formats.json`` lists variants in formats other than TorchScript (the structure of this file is unchanged, so
#    agents that read schema 2 still install the TorchScript variants)
SCHEMA_VERSION = 3
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
GOLDEN_NAME = "golden.npz"
VARIANTS_DIR = "variants/"  # every variant's file lies under it, in a folder named after the variant
VARIANT_NAMES = ("cpu-fp32", "cuda-fp32", "cuda-fp16")
_CHUNK_BYTES = 1 << 20


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FileEntry(_Strict):
    """Digest and size of one bundle file."""

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class TensorSpec(_Strict):
    """Shape and meaning of the model's input or output tensor."""

    name: str
    shape: list[int]
    dtype: str
    layout: str
    description: str


class Variant(_Strict):
    """One TorchScript file made for one device and dtype."""

    name: str
    path: str
    device: Literal["cpu", "cuda"]
    dtype: Literal["float32", "float16"]
    batch: int


class Source(_Strict):
    """Where the exported model came from."""

    model: str
    kind: Literal["weights", "config"]
    weights_sha256: str | None = None
    ultralytics: str | None = None


class GoldenInfo(_Strict):
    """What ``golden.npz`` holds, for people reading the manifest."""

    path: str
    images: list[str]
    noise_inputs: int
    seed: int
    reference_devices: list[Literal["cpu", "cuda"]] = Field(
        default=["cpu"], description="devices the eager reference outputs were computed on"
    )


class Manifest(_Strict):
    """``manifest.json``: everything a registry, a rollout service or a device needs to know about a bundle."""

    schema_version: int = SCHEMA_VERSION
    name: str  # the product line (the registered model) this bundle is for: registering it under another is refused
    # Grows with every export of a product line (default: the export's UTC time as YYYYMMDDHHMMSS). A device refuses
    # a lower release than the one it runs unless an operator ordered the downgrade. None: schema 1, before releases.
    release: int | None = Field(default=None, ge=1)
    task: Literal["detect"]
    imgsz: tuple[int, int]
    stride: int
    names: dict[int, str]
    input: TensorSpec
    output: TensorSpec
    created_at: str
    source: Source
    fingerprint: Fingerprint
    variants: dict[str, Variant]
    skipped_variants: dict[str, str] = Field(default_factory=dict)
    golden: GoldenInfo
    thresholds: GateThresholds
    latency_budget_ms: float | None = None
    gates: dict[str, VariantGates]
    gates_passed: bool
    files: dict[str, FileEntry]

    def to_json_bytes(self) -> bytes:
        """The exact bytes written to ``manifest.json`` (stable key order, so digests are reproducible)."""
        return (json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n").encode()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def file_entry(path: Path) -> FileEntry:
    """Digest and size of ``path``."""
    return FileEntry(sha256=sha256_file(path), bytes=path.stat().st_size)


def plain_relative(relative: str) -> PurePosixPath:
    """``relative`` (a manifest path) as a plain relative path; ``UnsafePathError`` for one that could leave."""
    pure = PurePosixPath(relative)
    if not pure.parts or pure.is_absolute() or "\\" in relative or ":" in pure.parts[0]:
        raise UnsafePathError(f"manifest path {relative!r} is empty, absolute or not a plain relative path")
    if ".." in pure.parts:
        raise UnsafePathError(f"manifest path {relative!r} leaves the bundle directory")
    return pure


def safe_join(root: Path, relative: str) -> Path:
    """Resolve ``relative`` (a manifest path) under ``root``; refuse absolute paths and ones that leave ``root``."""
    candidate = (root / Path(*plain_relative(relative).parts)).resolve()
    if not candidate.is_relative_to(root.resolve()):
        raise UnsafePathError(f"manifest path {relative!r} resolves outside the bundle directory")
    return candidate


def read_manifest(bundle_dir: Path) -> Manifest:
    """Parse ``manifest.json`` of a bundle (no file checks; see ``verify_files``)."""
    path = bundle_dir / MANIFEST_NAME
    if not bundle_dir.is_dir():
        raise ManifestError(f"{bundle_dir} is not a directory")
    if not path.is_file():
        raise ManifestError(f"{bundle_dir} has no {MANIFEST_NAME}: not a bundle")
    try:
        return Manifest.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ManifestError(f"{path} is not a valid manifest: {where}: {first['msg']}") from exc


def verify_files(bundle_dir: Path, manifest: Manifest) -> None:
    """Check the size and sha256 of every listed file; raise on the first missing, altered or unsafe one."""
    for relative, entry in sorted(manifest.files.items()):
        path = safe_join(bundle_dir, relative)
        if not path.is_file():
            raise BundleIntegrityError(f"{relative} is listed in the manifest but missing from {bundle_dir}")
        size = path.stat().st_size
        if size != entry.bytes:
            raise BundleIntegrityError(f"{relative} has {size} bytes, the manifest says {entry.bytes}")
        actual = sha256_file(path)
        if actual != entry.sha256:
            raise BundleIntegrityError(
                f"{relative} has sha256 {actual[:12]}..., the manifest says {entry.sha256[:12]}...: altered"
            )
    for variant in manifest.variants.values():
        if variant.path not in manifest.files:
            raise BundleIntegrityError(f"variant {variant.name} file {variant.path} is not listed in the manifest")
    if manifest.golden.path not in manifest.files:
        raise BundleIntegrityError(f"golden data {manifest.golden.path} is not listed in the manifest")


def load_verified(bundle_dir: Path) -> Manifest:
    """Read a bundle's manifest and verify every listed file; the entry point for anything that uses a bundle."""
    manifest = read_manifest(bundle_dir)
    verify_files(bundle_dir, manifest)
    return manifest


def write_manifest(bundle_dir: Path, manifest: Manifest) -> Path:
    """Write ``manifest.json`` atomically (``exporters.files.atomic_write``)."""
    return atomic_write(bundle_dir / MANIFEST_NAME, manifest.to_json_bytes())


def list_files(bundle_dir: Path, relative_paths: list[str]) -> dict[str, FileEntry]:
    """Digest the given bundle files into the manifest's ``files`` mapping."""
    return {relative: file_entry(safe_join(bundle_dir, relative)) for relative in sorted(relative_paths)}
