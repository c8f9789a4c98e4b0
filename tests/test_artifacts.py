"""Artifacts: atomic folders, manifests written last, hash checks that catch tampering."""

import json
from pathlib import Path

import pytest

from signpost.artifacts import (
    ArtifactError,
    artifact_path,
    atomic_dir,
    code_version,
    hash_json,
    is_complete,
    read_manifest,
    verify_artifact,
    write_manifest,
)


def _make(folder: Path) -> dict:
    with atomic_dir(folder) as tmp:
        (tmp / "weights.bin").write_bytes(b"\x00\x01" * 100)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "card.json").write_text("{}")
        return write_manifest(tmp, stage="test", key="k", inputs={"a": 1}, config={"x": 2}, code="c0de")


def test_atomic_dir_renames_into_place_with_a_manifest(tmp_path: Path) -> None:
    folder = artifact_path(tmp_path, "stage", "name", "0123456789abcdef")
    assert folder == tmp_path / "stage" / "name-0123456789ab"
    manifest = _make(folder)
    assert is_complete(folder)
    assert set(manifest["files"]) == {"weights.bin", "sub/card.json"}
    assert read_manifest(folder)["inputs"] == {"a": 1}
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary folder left


def test_a_failure_inside_leaves_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "stage" / "broken"
    with pytest.raises(RuntimeError), atomic_dir(folder) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("stage crashed")
    assert not folder.exists()
    assert list(folder.parent.iterdir()) == []


def test_an_interrupt_inside_leaves_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "stage" / "interrupted"
    with pytest.raises(KeyboardInterrupt), atomic_dir(folder) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise KeyboardInterrupt
    assert list(folder.parent.iterdir()) == []


def test_verify_catches_a_modified_file(tmp_path: Path) -> None:
    folder = tmp_path / "a"
    _make(folder)
    verify_artifact(folder)
    (folder / "weights.bin").write_bytes(b"tampered")
    with pytest.raises(ArtifactError, match=r"weights\.bin does not match its manifest"):
        verify_artifact(folder)
    verify_artifact(folder, ["sub/card.json"])  # other files still check out


def test_verify_catches_missing_and_unlisted_files(tmp_path: Path) -> None:
    folder = tmp_path / "a"
    _make(folder)
    (folder / "sub" / "card.json").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        verify_artifact(folder)
    with pytest.raises(ArtifactError, match="not listed"):
        verify_artifact(folder, ["other.bin"])


def test_incomplete_or_foreign_folders_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="not found"):
        read_manifest(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    with pytest.raises(ArtifactError, match=r"no manifest\.json"):
        read_manifest(tmp_path / "half")
    (tmp_path / "half" / "manifest.json").write_text(json.dumps({"some": "thing"}))
    with pytest.raises(ArtifactError, match="not a Signpost manifest"):
        read_manifest(tmp_path / "half")


def test_hash_json_is_canonical() -> None:
    assert hash_json({"a": 1, "b": [1, 2]}) == hash_json({"b": [1, 2], "a": 1})
    assert hash_json({"a": 1}) != hash_json({"a": 2})


def test_code_version_follows_the_source() -> None:
    assert code_version("signpost.artifacts") == code_version("signpost.artifacts")
    assert code_version("signpost.artifacts") != code_version("signpost.config")
    assert len(code_version("signpost.data")) == 16
