"""An on-disk cache of build artifacts (ONNX files, TensorRT plans) that is never trusted blindly.

Each artifact lives in a directory named by the digest of its key (model content hash, library
versions, build options). A manifest written after the artifact records the key and the artifact's
SHA-256; on reuse both are checked, so a stale, truncated or corrupt file is rebuilt, not loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

logger = logging.getLogger(__name__)

_MANIFEST = "manifest.json"
_CHUNK_BYTES = 1 << 20


def default_cache_dir() -> str:
    return str(Path.home() / ".cache" / "rerank-sidecar")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def key_digest(key: Mapping[str, str]) -> str:
    return hashlib.sha256(json.dumps(dict(key), sort_keys=True).encode()).hexdigest()[:24]


class ArtifactCache:
    def __init__(self, root: Path) -> None:
        self.root = root

    def entry_dir(self, kind: str, key: Mapping[str, str]) -> Path:
        return self.root / f"{kind}-{key_digest(key)}"

    def get_or_build(
        self, kind: str, key: Mapping[str, str], filename: str, build: Callable[[Path], None]
    ) -> Path:
        """The path of a verified artifact for ``key``; ``build(path)`` writes it when none is valid.

        ``build`` may write companion files beside ``path`` (ONNX external data); only ``path``
        itself is checksummed.
        """
        entry = self.entry_dir(kind, key)
        artifact = entry / filename
        problem = self._verify(entry, key, filename)
        if problem is None:
            logger.info("reusing cached %s %s", kind, artifact)
            return artifact
        if problem != "absent":
            logger.warning("rebuilding cached %s in %s: %s", kind, entry, problem)
        entry.parent.mkdir(parents=True, exist_ok=True)
        # Build in a private directory and swap it in, so a crash or a concurrent start never
        # leaves a half-written artifact under the final name.
        staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
        try:
            build(staging / filename)
            manifest = {"key": dict(key), "file": filename, "sha256": file_sha256(staging / filename)}
            (staging / _MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
            shutil.rmtree(entry, ignore_errors=True)
            try:
                os.replace(staging, entry)
            except OSError:
                if self._verify(entry, key, filename) is not None:  # no concurrent builder won the race
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return artifact

    @staticmethod
    def _verify(entry: Path, key: Mapping[str, str], filename: str) -> str | None:
        """None when the entry is valid; otherwise why not."""
        manifest_path = entry / _MANIFEST
        if not manifest_path.is_file():
            return "absent"
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as exc:
            return f"unreadable manifest ({exc})"
        if not isinstance(manifest, dict) or manifest.get("key") != dict(key):
            return "its key differs (stale entry)"
        artifact = entry / filename
        if manifest.get("file") != filename or not artifact.is_file():
            return "the artifact file is missing"
        if file_sha256(artifact) != manifest.get("sha256"):
            return "the artifact's checksum does not match its manifest (corrupt file)"
        return None
