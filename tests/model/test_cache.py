from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import onnx
import pytest
import torch

from sidecar.model import export as export_module
from sidecar.model.cache import (
    ArtifactCache,
    recording_cache_use,
    remove_entries,
    remove_unused_entries,
    usable_cache_dir,
    write_json_atomically,
    write_problem,
)
from sidecar.model.engines import onnxruntime_engine
from sidecar.model.engines.onnxruntime_engine import OnnxRuntimeEngine, optimized_model
from sidecar.model.export import export_onnx
from sidecar.model.kinds import load_network
from sidecar.model.loading import ModelKind, ModelSource
from sidecar.model.network import content_hash
from tests.model.conftest import CROSS_ENCODER_INPUTS
from tests.models import save_tiny_bert

KEY = {"model": "abc", "torch": "1"}


def build_counter(content: bytes = b"artifact") -> tuple[list[Path], object]:
    built: list[Path] = []

    def build(target: Path) -> None:
        built.append(target)
        target.write_bytes(content)

    return built, build


def test_an_artifact_is_built_once_and_then_reused(tmp_path: Path):
    cache = ArtifactCache(tmp_path)
    built, build = build_counter()
    first = cache.get_or_build("thing", KEY, "file.bin", build)
    second = cache.get_or_build("thing", KEY, "file.bin", build)
    assert first == second
    assert first.read_bytes() == b"artifact"
    assert len(built) == 1


def test_a_different_key_gets_its_own_artifact(tmp_path: Path):
    cache = ArtifactCache(tmp_path)
    built, build = build_counter()
    first = cache.get_or_build("thing", KEY, "file.bin", build)
    second = cache.get_or_build("thing", {**KEY, "torch": "2"}, "file.bin", build)
    assert first != second
    assert len(built) == 2


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda entry: (entry / "file.bin").write_bytes(b"artifaXt"), id="corrupt-file"),
        pytest.param(lambda entry: (entry / "file.bin").write_bytes(b"arti"), id="truncated-file"),
        pytest.param(lambda entry: (entry / "file.bin").unlink(), id="missing-file"),
        pytest.param(lambda entry: (entry / "manifest.json").write_text("{"), id="corrupt-manifest"),
        pytest.param(
            lambda entry: (entry / "manifest.json").write_text(
                json.dumps({**json.loads((entry / "manifest.json").read_text()), "key": {"model": "old"}})
            ),
            id="stale-manifest",
        ),
    ],
)
def test_a_damaged_or_stale_entry_is_rebuilt_not_trusted(tmp_path: Path, damage):
    cache = ArtifactCache(tmp_path)
    built, build = build_counter()
    path = cache.get_or_build("thing", KEY, "file.bin", build)
    damage(path.parent)
    rebuilt = cache.get_or_build("thing", KEY, "file.bin", build)
    assert rebuilt.read_bytes() == b"artifact"
    assert len(built) == 2


def test_an_entry_this_process_may_not_read_is_rebuilt_not_a_failed_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # Another user's entry on a shared volume: reading it raises EACCES (root here reads everything).
    cache = ArtifactCache(tmp_path)
    built, build = build_counter()
    path = cache.get_or_build("thing", KEY, "file.bin", build)
    readable = Path.is_file

    def denied(self: Path) -> bool:
        if self.parent == path.parent and len(built) == 1:
            raise PermissionError(13, "Permission denied", str(self))
        return readable(self)

    monkeypatch.setattr(Path, "is_file", denied)
    assert not cache.holds("thing", KEY, "file.bin")
    assert cache.get_or_build("thing", KEY, "file.bin", build).read_bytes() == b"artifact"
    assert len(built) == 2


def test_entries_and_records_are_readable_by_the_other_users_of_the_volume(tmp_path: Path):
    path = ArtifactCache(tmp_path).get_or_build("thing", KEY, "file.bin", build_counter()[1])
    assert path.parent.stat().st_mode & 0o777 == 0o755
    write_json_atomically(tmp_path / "warm" / "record.json", {"a": 1})
    assert (tmp_path / "warm" / "record.json").stat().st_mode & 0o777 == 0o644


def test_a_record_that_cannot_be_written_leaves_no_staging_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(json, "dump", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_json_atomically(tmp_path / "warm" / "record.json", {"a": 1})
    assert list((tmp_path / "warm").iterdir()) == []


def test_an_entry_another_start_built_meanwhile_is_kept_not_replaced(tmp_path: Path):
    # Two replicas on one cache volume: the one that finishes second must not remove what the first,
    # which may be reading it already, swapped in.
    cache = ArtifactCache(tmp_path)
    theirs: list[int] = []

    def build_while_another_start_finishes(target: Path) -> None:
        entry = cache.get_or_build("thing", KEY, "file.bin", build_counter(b"theirs")[1]).parent
        theirs.append(entry.stat().st_ino)
        target.write_bytes(b"ours")

    with recording_cache_use() as use:
        path = cache.get_or_build("thing", KEY, "file.bin", build_while_another_start_finishes)
    assert path.read_bytes() == b"theirs"
    assert path.parent.stat().st_ino == theirs[0]
    assert [entry.name for entry in tmp_path.iterdir()] == [path.parent.name]  # no staging left
    assert use.built == {path.parent}  # the inner (their) build; this one counts as a reuse


def test_a_failed_build_leaves_no_entry_behind(tmp_path: Path):
    cache = ArtifactCache(tmp_path)

    def failing(target: Path) -> None:
        target.write_bytes(b"half")
        raise RuntimeError("build failed")

    with pytest.raises(RuntimeError):
        cache.get_or_build("thing", KEY, "file.bin", failing)
    assert list(tmp_path.iterdir()) == []


def test_the_entries_built_and_handed_out_are_recorded_until_the_block_ends(tmp_path: Path):
    cache = ArtifactCache(tmp_path)
    _, build = build_counter()
    earlier = cache.get_or_build("thing", KEY, "file.bin", build).parent
    with recording_cache_use() as use:
        reused = cache.get_or_build("thing", KEY, "file.bin", build).parent
        built = cache.get_or_build("thing", {**KEY, "torch": "2"}, "file.bin", build).parent
        read = ArtifactCache(tmp_path, reuse_only=True).cached("thing", KEY, "file.bin").parent
    cache.get_or_build("other", KEY, "file.bin", build)  # after the block: not recorded
    assert reused == read == earlier
    assert use.built == {built}
    assert use.handed_out == {earlier, built}


def test_removing_entries_deletes_them_whole_and_counts_their_bytes(tmp_path: Path):
    cache = ArtifactCache(tmp_path)
    kept = cache.get_or_build("thing", KEY, "file.bin", build_counter(b"x" * 100)[1]).parent
    gone = cache.get_or_build("thing", {**KEY, "torch": "2"}, "file.bin", build_counter(b"y" * 300)[1]).parent
    (gone / "file.bin.data").write_bytes(b"z" * 50)  # a companion file, as ONNX external data
    manifest_bytes = (gone / "manifest.json").stat().st_size
    assert remove_entries([gone]) == 300 + 50 + manifest_bytes
    assert not gone.exists()
    assert (kept / "file.bin").read_bytes() == b"x" * 100


def _age(path: Path, days: float) -> None:
    then = time.time() - days * 86400
    os.utime(path, (then, then))


def test_entries_unused_past_the_retention_and_abandoned_builds_are_removed(tmp_path: Path):
    cache = ArtifactCache(tmp_path)
    _, build = build_counter(b"x" * 100)
    stale = cache.get_or_build("openvino", KEY, "model.blob", build).parent
    recent = cache.get_or_build("openvino", {**KEY, "torch": "2"}, "model.blob", build).parent
    old_but_reused = cache.get_or_build("onnx", KEY, "model.onnx", build).parent
    old_but_read = cache.get_or_build("tokenizer", KEY, "tokenizer.json", build).parent
    for entry, days in ((stale, 31), (recent, 29), (old_but_reused, 90), (old_but_read, 90)):
        _age(entry / "manifest.json", days)
    cache.get_or_build("onnx", KEY, "model.onnx", build)  # this start uses them: they are kept
    ArtifactCache(tmp_path, reuse_only=True).cached("tokenizer", KEY, "tokenizer.json")
    abandoned = tmp_path / f".{stale.name}-k3y_x9"
    (abandoned / "model.blob").parent.mkdir()
    (abandoned / "model.blob").write_bytes(b"y" * 50)
    _age(abandoned, 2)
    building = tmp_path / f".{recent.name}-a8b_c1"  # a build under way in another start
    building.mkdir()
    records = [tmp_path / "verdicts" / "v.json", tmp_path / "warm" / "w.json", tmp_path / "inductor" / "k.py"]
    for record in records:
        record.parent.mkdir(exist_ok=True)
        record.write_text("{}")
        _age(record, 400)
        _age(record.parent, 400)

    stale_bytes = sum(path.stat().st_size for path in stale.iterdir())

    removed = remove_unused_entries(tmp_path, 30)

    assert removed.unused == (stale.name,)
    assert removed.unused_bytes == stale_bytes
    assert (removed.abandoned_builds, removed.abandoned_bytes) == (1, 50)
    assert not stale.exists()
    assert not abandoned.exists()
    assert all(path.exists() for path in (recent, old_but_reused, old_but_read, building, *records))


def test_a_retention_of_zero_keeps_every_entry_but_not_abandoned_builds(tmp_path: Path):
    cache = ArtifactCache(tmp_path)
    entry = cache.get_or_build("onnx", KEY, "model.onnx", build_counter()[1]).parent
    _age(entry / "manifest.json", 3650)
    abandoned = tmp_path / f".{entry.name}-k3y_x9"
    abandoned.mkdir()
    _age(abandoned, 2)
    removed = remove_unused_entries(tmp_path, 0)
    assert (removed.unused, removed.abandoned_builds) == ((), 1)
    assert entry.exists()
    assert not abandoned.exists()


def test_clearing_a_missing_cache_dir_removes_nothing(tmp_path: Path):
    assert remove_unused_entries(tmp_path / "absent", 30).unused == ()


def test_the_export_is_reused_on_a_second_start(tiny_network, tiny_exported, artifact_cache, monkeypatch):
    def no_export(*args: object, **kwargs: object) -> None:
        raise AssertionError("exported again although the cache held a valid file")

    monkeypatch.setattr(torch.onnx, "export", no_export)
    again = export_onnx(tiny_network, content_hash(tiny_network), CROSS_ENCODER_INPUTS, artifact_cache)
    assert again.path == tiny_exported.path


def test_the_compiled_onnxruntime_files_are_reused_on_a_second_start(
    tiny_exported, artifact_cache, monkeypatch
):
    first = {
        precision: optimized_model(tiny_exported, precision, "cpu", artifact_cache)
        for precision in ("fp32", "int8")
    }

    def no_rebuild(*args: object) -> None:
        raise AssertionError("rebuilt although the cache held a valid file")

    monkeypatch.setattr(onnxruntime_engine, "_fuse", no_rebuild)
    monkeypatch.setattr(onnxruntime_engine, "_quantize", no_rebuild)
    for precision, path in first.items():
        assert optimized_model(tiny_exported, precision, "cpu", artifact_cache) == path


def test_a_changed_model_is_exported_and_compiled_again(tmp_path: Path, tiny_exported, artifact_cache):
    source = ModelSource(str(save_tiny_bert(tmp_path / "retrained", seed=7)))
    network = load_network(source, ModelKind.CROSS_ENCODER)
    exported = export_onnx(network, content_hash(network), CROSS_ENCODER_INPUTS, artifact_cache)
    assert exported.fingerprint != tiny_exported.fingerprint
    assert exported.path != tiny_exported.path
    assert optimized_model(exported, "fp32", "cpu", artifact_cache) != optimized_model(
        tiny_exported, "fp32", "cpu", artifact_cache
    )


def test_a_corrupt_cached_export_is_rebuilt_and_loads(tmp_path: Path, tiny_network, monkeypatch):
    cache = ArtifactCache(tmp_path)
    fingerprint = content_hash(tiny_network)
    exported = export_onnx(tiny_network, fingerprint, CROSS_ENCODER_INPUTS, cache)
    exports = []
    real_export = export_module._export
    monkeypatch.setattr(export_module, "_export", lambda *args: exports.append(args) or real_export(*args))
    with exported.path.open("r+b") as stream:  # flip bytes in the middle of the weights
        stream.seek(exported.path.stat().st_size // 2)
        stream.write(b"\x00" * 64)
    again = export_onnx(tiny_network, fingerprint, CROSS_ENCODER_INPUTS, cache)
    assert len(exports) == 1
    onnx.checker.check_model(str(again.path))
    OnnxRuntimeEngine(again, cache, precision="fp32", device="cpu", threads=1)


def unwritable(tmp_path: Path) -> Path:
    """A cache directory no one can create, root included: its parent is a regular file."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    return blocker / "cache"


def test_an_unwritable_cache_dir_is_one_warning_and_a_temporary_directory(tmp_path: Path, caplog):
    configured = unwritable(tmp_path)
    with caplog.at_level(logging.WARNING, logger="sidecar.model.cache"):
        first = usable_cache_dir(configured)
        second = usable_cache_dir(configured)  # a second model of the same server
    assert first == second != configured
    assert write_problem(first) is None
    (warning,) = caplog.records
    assert str(configured) in warning.getMessage()
    assert "nothing will be remembered" in warning.getMessage()
    assert "NotADirectoryError" in warning.getMessage()


def test_a_writable_cache_dir_is_used_as_it_is(tmp_path: Path, caplog):
    with caplog.at_level(logging.WARNING, logger="sidecar.model.cache"):
        assert usable_cache_dir(tmp_path / "fresh") == tmp_path / "fresh"
    assert (tmp_path / "fresh").is_dir()
    assert not caplog.records
    assert list((tmp_path / "fresh").iterdir()) == []  # the probe leaves nothing behind
