"""An on-disk cache of build artifacts (ONNX files, OpenVINO blobs, TensorRT plans) that is never
trusted blindly.

Each artifact lives in a directory named by the digest of its key (model content hash, library
versions, build options). A manifest written after the artifact records the key and the artifact's
SHA-256; on reuse both are checked, so a stale, truncated or corrupt file is logged and rebuilt, not
loaded.

A reuse-only cache (``reuse_only=True``: a warm start without the libraries that build) raises
a ModelLoadError with the reason where it would build, so the start can go the full way instead.

A cache directory that cannot be written is not an error: ``usable_cache_dir`` says so once and hands
out a temporary directory instead, so the server still starts, only without remembering anything.

``recording_cache_use`` notes which entries a stretch of work built and which it was handed (built or
reused), so a start can remove what it built that serving turned out not to need (``remove_entries``).

Every use of an entry marks its manifest's modification time, so ``remove_unused_entries`` can remove
what no start has used for a while: the artifacts of models no longer served and of library versions
no longer installed, which would otherwise fill the volume upgrade after upgrade, and the builds of
starts that were killed before they finished.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sidecar.errors import ModelLoadError

logger = logging.getLogger(__name__)

_MANIFEST = "manifest.json"
# What tempfile's private modes (0700, 0600) become once swapped in: readable by the other users of a
# cache volume that several pods share (their writes go to entries of their own).
_SHARED_DIRECTORY_MODE = 0o755
_SHARED_FILE_MODE = 0o644
_CHUNK_BYTES = 1 << 20


def default_cache_dir() -> str:
    return str(Path.home() / ".cache" / "rerank-sidecar")


@functools.cache
def usable_cache_dir(configured: Path) -> Path:
    """``configured`` when it can be written; otherwise, with one warning per process, a temporary
    directory removed at exit, where this start builds what it needs and remembers nothing."""
    problem = write_problem(configured)
    if problem is None:
        return configured
    try:
        fallback = Path(tempfile.mkdtemp(prefix="rerank-sidecar-cache-"))
    except OSError as exc:
        raise ModelLoadError(
            f"--cache-dir {configured} cannot be written ({problem}), and neither can a temporary "
            f"directory ({type(exc).__name__}: {exc}); mount a writable volume at --cache-dir, or point "
            "TMPDIR at a writable directory"
        ) from exc
    atexit.register(shutil.rmtree, fallback, ignore_errors=True)
    logger.warning(
        "--cache-dir %s cannot be written (%s), so nothing will be remembered: every start selects, "
        "exports and compiles its engine afresh, this one in the temporary directory %s (removed at "
        "exit). Mount a writable volume at --cache-dir to keep them across restarts",
        configured,
        problem,
        fallback,
    )
    return fallback


def write_problem(directory: Path) -> str | None:
    """Why a file cannot be created in ``directory`` (made first if missing), or None when it can."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def write_json_atomically(path: Path, data: Mapping[str, Any]) -> None:
    """``data`` as JSON at ``path``, swapped in whole, so a reader never sees half a file; OSError when
    the directory cannot be written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(data, stream, indent=2, sort_keys=True)
        os.chmod(staging, _SHARED_FILE_MODE)
        os.replace(staging, path)
    except BaseException:  # a full disk: no half-written staging file left behind
        Path(staging).unlink(missing_ok=True)
        raise


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def key_digest(key: Mapping[str, str]) -> str:
    return hashlib.sha256(json.dumps(dict(key), sort_keys=True).encode()).hexdigest()[:24]


@dataclass
class CacheUse:
    """The cache entries (artifact directories) that work built, and every one it was handed."""

    built: set[Path] = field(default_factory=set)
    handed_out: set[Path] = field(default_factory=set)


_CACHE_USE: ContextVar[CacheUse | None] = ContextVar("cache_use", default=None)


@contextmanager
def recording_cache_use() -> Iterator[CacheUse]:
    """Notes the entries any ``ArtifactCache`` builds or hands out in this thread until the block ends."""
    use = CacheUse()
    token = _CACHE_USE.set(use)
    try:
        yield use
    finally:
        _CACHE_USE.reset(token)


def _note_use(entry: Path, *, built: bool) -> None:
    with contextlib.suppress(OSError):  # a volume mounted read-only: nothing will be removed from it
        os.utime(entry / _MANIFEST)
    use = _CACHE_USE.get()
    if use is not None:
        use.handed_out.add(entry)
        if built:
            use.built.add(entry)


def remove_entries(entries: Iterable[Path]) -> int:
    """Removes cache entries whole; the bytes their files held."""
    freed = 0
    for entry in entries:
        with contextlib.suppress(OSError):  # a file removed meanwhile
            freed += sum(path.stat().st_size for path in entry.rglob("*") if path.is_file())
        shutil.rmtree(entry, ignore_errors=True)
    return freed


# An entry's directory, and the private directory a build writes in before it is swapped in under that
# name (``ArtifactCache.get_or_build``).
_ENTRY_NAME = re.compile(r"[a-z0-9][a-z0-9-]*-[0-9a-f]{24}")
_BUILD_NAME = re.compile(r"\.[a-z0-9][a-z0-9-]*-[0-9a-f]{24}-.+")
# A build's private directory this old belongs to a start that was stopped or killed (a finishing build
# swaps its directory in at once; the longest, a base-sized model's calibration, takes minutes).
_ABANDONED_BUILD_SECONDS = 24 * 3600


@dataclass(frozen=True)
class RemovedEntries:
    """What ``remove_unused_entries`` removed: entry names and bytes, and abandoned builds."""

    unused: tuple[str, ...] = ()
    unused_bytes: int = 0
    abandoned_builds: int = 0
    abandoned_bytes: int = 0


def remove_unused_entries(root: Path, retention_days: float) -> RemovedEntries:
    """Removes the entries under ``root`` that no start has used for ``retention_days`` (none when it is
    0), and the private directories of builds abandoned a day ago or more. Records and other files
    (verdicts, warm-start records, TorchInductor's kernels) are left alone: a record whose artifacts
    are gone sends its model's next start the full way."""
    now = time.time()
    unused: list[Path] = []
    abandoned: list[Path] = []
    for path in root.iterdir() if root.is_dir() else ():
        with contextlib.suppress(OSError):  # removed meanwhile by another start on the same volume
            if _ENTRY_NAME.fullmatch(path.name) and (path / _MANIFEST).is_file():
                unused_days = (now - (path / _MANIFEST).stat().st_mtime) / 86400
                if retention_days > 0 and unused_days > retention_days:
                    unused.append(path)
            elif _BUILD_NAME.fullmatch(path.name) and now - path.stat().st_mtime > _ABANDONED_BUILD_SECONDS:
                abandoned.append(path)
    return RemovedEntries(
        tuple(sorted(path.name for path in unused)),
        remove_entries(unused),
        len(abandoned),
        remove_entries(abandoned),
    )


class ArtifactCache:
    def __init__(self, root: Path, *, reuse_only: bool = False) -> None:
        self.root = root
        self.reuse_only = reuse_only

    def entry_dir(self, kind: str, key: Mapping[str, str]) -> Path:
        return self.root / f"{kind}-{key_digest(key)}"

    def cached(self, kind: str, key: Mapping[str, str], filename: str) -> Path:
        """The path of a verified artifact for ``key``; when there is none, a ModelLoadError naming the
        file and why."""
        artifact = self.entry_dir(kind, key) / filename
        problem = self._verify(self.entry_dir(kind, key), key, filename)
        if problem is not None:
            raise ModelLoadError(f"the cached {kind} {artifact} is unusable: {problem}")
        logger.info("reusing cached %s %s", kind, artifact)
        _note_use(artifact.parent, built=False)
        return artifact

    def holds(self, kind: str, key: Mapping[str, str], filename: str) -> bool:
        """Whether a verified artifact for ``key`` is there, without handing it out."""
        return self._verify(self.entry_dir(kind, key), key, filename) is None

    def get_or_build(
        self, kind: str, key: Mapping[str, str], filename: str, build: Callable[[Path], None]
    ) -> Path:
        """The path of a verified artifact for ``key``; ``build(path)`` writes it when none is valid.

        ``build`` may write companion files beside ``path`` (ONNX external data); only ``path``
        itself is checksummed.
        """
        if self.reuse_only:
            return self.cached(kind, key, filename)
        entry = self.entry_dir(kind, key)
        artifact = entry / filename
        problem = self._verify(entry, key, filename)
        if problem is None:
            logger.info("reusing cached %s %s", kind, artifact)
            _note_use(entry, built=False)
            return artifact
        if problem != "absent":
            logger.warning("rebuilding cached %s %s: %s", kind, artifact, problem)
        entry.parent.mkdir(parents=True, exist_ok=True)
        # Build in a private directory and swap it in, so a crash or a concurrent start never
        # leaves a half-written artifact under the final name.
        staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
        try:
            build(staging / filename)
            manifest = {"key": dict(key), "file": filename, "sha256": file_sha256(staging / filename)}
            (staging / _MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
            os.chmod(staging, _SHARED_DIRECTORY_MODE)
            if self._verify(entry, key, filename) is None:  # another start built it meanwhile: keep theirs
                built_here = False
            else:
                shutil.rmtree(entry, ignore_errors=True)
                try:
                    os.replace(staging, entry)
                    built_here = True
                except OSError:
                    if self._verify(entry, key, filename) is not None:  # no concurrent builder won the race
                        raise
                    built_here = False
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        _note_use(entry, built=built_here)
        return artifact

    @staticmethod
    def _verify(entry: Path, key: Mapping[str, str], filename: str) -> str | None:
        """None when the entry is valid; otherwise why not (one this process may not read included)."""
        manifest_path = entry / _MANIFEST
        try:
            if not manifest_path.is_file():
                return "absent"
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as exc:
            return f"unreadable manifest ({exc})"
        if not isinstance(manifest, dict) or manifest.get("key") != dict(key):
            return "its key differs (stale entry)"
        artifact = entry / filename
        try:
            if manifest.get("file") != filename or not artifact.is_file():
                return "the artifact file is missing"
            if file_sha256(artifact) != manifest.get("sha256"):
                return "the artifact's checksum does not match its manifest (corrupt file)"
        except OSError as exc:
            return f"unreadable artifact ({exc})"
        return None
