"""Edge bundles: `signpost package --target edge` writes a signed bundle a device can verify and self-test; a bundle
changed after signing, signed by another key, or a tarball that reaches outside its folder is refused before the
runtime reads any of it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from signpost.edge.bundle import BUNDLE_JSON, PTE, SAMPLES_JSON, BundleError, open_bundle, read_image, self_test


def test_package_writes_a_bundle_that_opens_and_classifies_its_samples(edge_bundle, edge_keys) -> None:
    edge_keys.trust()
    bundle = open_bundle(edge_bundle.path)
    names = {p.relative_to(edge_bundle.path).as_posix() for p in edge_bundle.path.rglob("*") if p.is_file()}
    assert {PTE, "model_card.json", BUNDLE_JSON, SAMPLES_JSON, "manifest.json", "manifest.sig"} <= names
    assert not names & {"model.safetensors", "model.onnx", "program.pt2", "model.xml"}  # minimal: the program only
    assert 2 <= len(bundle.samples) <= 8
    predictor = bundle.predictor(threads=1)
    for path, expected in bundle.samples:
        assert int(predictor.from_images(read_image(path, bundle.image_size)[None]).argmax(1)[0]) == expected
    self_test(bundle, threads=1)
    assert edge_bundle.tarball.is_file() and edge_bundle.tarball.name == edge_bundle.path.name + ".tar.gz"


@pytest.fixture
def bundle_copy(edge_bundle, tmp_path: Path) -> Path:
    """A private copy of the session's bundle that a test may change."""
    return Path(shutil.copytree(edge_bundle.path, tmp_path / edge_bundle.path.name))


@pytest.fixture
def runtime_never_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any program reaches the ExecuTorch runtime."""
    import signpost.runtime

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the runtime read a program from a bundle that should have been refused first")

    monkeypatch.setattr(signpost.runtime, "executorch_forward", refuse)


@pytest.mark.parametrize("name", [PTE, SAMPLES_JSON, BUNDLE_JSON, "samples/00.png", "model_card.json"])
def test_a_file_changed_after_signing_is_refused_before_the_runtime_reads_it(
        bundle_copy: Path, edge_keys, runtime_never_loads: None, name: str) -> None:
    path = bundle_copy / name
    if name == SAMPLES_JSON:  # a plausible edit: every sample claims class 0
        path.write_text(json.dumps(dict.fromkeys(json.loads(path.read_text()), 0)))
    else:
        path.write_bytes(path.read_bytes()[:-1] + bytes([path.read_bytes()[-1] ^ 1]))
    edge_keys.trust()
    with pytest.raises(BundleError, match=f"refused bundle: .*{name.split('/')[-1]} does not match its manifest"):
        open_bundle(bundle_copy)


def test_a_file_the_manifest_does_not_list_is_refused(bundle_copy: Path, edge_keys) -> None:
    (bundle_copy / "samples" / "extra.so").write_bytes(b"\x7fELF")
    edge_keys.trust()
    with pytest.raises(BundleError, match=r"samples/extra\.so not listed in its manifest"):
        open_bundle(bundle_copy)


def test_a_bundle_signed_by_another_key_is_refused(bundle_copy: Path, edge_keys, runtime_never_loads: None) -> None:
    from signpost import signing

    edge_keys.sign_with(edge_keys.other_private)  # a valid signature, by a key the device does not trust
    signing.sign(bundle_copy, (bundle_copy / "manifest.json").read_bytes())
    edge_keys.trust()
    with pytest.raises(BundleError, match="which is not trusted here"):
        open_bundle(bundle_copy)


def test_without_a_trusted_key_a_device_refuses_unless_told_otherwise_loudly(
        bundle_copy: Path, edge_keys, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(BundleError, match=r"no public key is trusted.*--public-key PEM.*--allow-unsigned"):
        open_bundle(bundle_copy)
    (bundle_copy / "manifest.sig").unlink()
    edge_keys.trust()
    with pytest.raises(BundleError, match="is not signed"):
        open_bundle(bundle_copy)
    from signpost import signing

    signing.configure(signing.Policy(allow_unsigned=True))
    assert open_bundle(bundle_copy).samples
    assert "WITHOUT checking who made it" in caplog.text


def _tarball(tmp_path: Path, *members: tuple[str, str]) -> Path:
    """A gzip tarball of ``(name, kind)`` members: kind file, dir, symlink, hardlink or fifo."""
    import io
    import tarfile

    out = tmp_path / "evil.tar.gz"
    with tarfile.open(out, "w:gz") as tar:
        for name, kind in members:
            info = tarfile.TarInfo(name)
            data = b"x"
            if kind == "dir":
                info.type = tarfile.DIRTYPE
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            elif kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, "b/a"
            elif kind == "fifo":
                info.type = tarfile.FIFOTYPE
            else:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if kind == "file" else None)
    return out


@pytest.mark.parametrize(("members", "why"), [
    ([("b", "dir"), ("b/../../escaped", "file")], "points outside the bundle"),
    ([("/tmp/escaped-absolute", "file")], "points outside the bundle"),
    ([("b", "dir"), ("b/model.pte", "symlink")], "is a link or a special file"),
    ([("b", "dir"), ("b/a", "file"), ("b/c", "hardlink")], "is a link or a special file"),
    ([("b", "dir"), ("b/pipe", "fifo")], "is a link or a special file"),
    ([("b/a", "file"), ("c/a", "file")], "expected one top folder"),
])
def test_unpack_refuses_members_that_reach_outside_or_are_not_plain(tmp_path: Path, members: list, why: str) -> None:
    from signpost.edge.bundle import unpack

    dest = tmp_path / "dest"
    with pytest.raises(BundleError, match=why):
        unpack(_tarball(tmp_path, *members), dest)
    assert not any(dest.rglob("*")) if dest.exists() else True
    assert not (tmp_path / "escaped").exists() and not Path("/tmp/escaped-absolute").exists()


@pytest.mark.parametrize("declared", [1 << 20, 1 << 70])  # bytes: a real 1 MiB pax header, and a forged size
def test_unpack_refuses_a_huge_header_extension_before_reading_it(tmp_path: Path, declared: int) -> None:
    import gzip
    import io
    import tarfile

    from signpost.edge.bundle import unpack

    out = tmp_path / "evil.tar.gz"
    if declared == 1 << 20:  # a pax header holding a 1 MiB path: tarfile would read it whole into memory
        with tarfile.open(out, "w:gz", format=tarfile.PAX_FORMAT) as tar:
            info = tarfile.TarInfo("b/" + "a" * (declared - 2))
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    else:  # a lone extension header declaring 2**70 bytes (base-256 size field), then nothing
        header = tarfile.TarInfo("././@PaxHeader")
        header.type, header.size = tarfile.XHDTYPE, declared
        out.write_bytes(gzip.compress(header.tobuf(tarfile.GNU_FORMAT) + bytes(1024)))
    dest = tmp_path / "dest"
    with pytest.raises(BundleError, match=r"evil\.tar\.gz: not a readable tarball \(a header extension declares "
                                          r"1,\d{3},\d{3}\S* bytes, more than 65,536; not a bundle, refused\)"):
        unpack(out, dest)
    assert not dest.exists()


def test_unpack_fsyncs_every_file_and_folder_before_the_rename(edge_bundle, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from signpost.edge.bundle import unpack

    synced, real_fsync = [], os.fsync

    def fsync(fd: int) -> None:  # the path of each fd synced, as the kernel names it (Linux)
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    folder = unpack(edge_bundle.tarball, tmp_path / "dest")
    files = {p.name for p in folder.rglob("*") if p.is_file()}
    assert files <= set(synced) and "samples" in synced and "dest" in synced  # files, a subfolder, the parent
    assert synced[-1] == "dest"  # the rename last, after everything it makes visible


def test_unpack_bounds_the_size(edge_bundle, tmp_path: Path) -> None:
    from signpost.edge.bundle import unpack

    with pytest.raises(BundleError, match="more than 1,000 bytes unpacked"):
        unpack(edge_bundle.tarball, tmp_path / "dest", max_bytes=1000)
    assert unpack(edge_bundle.tarball, tmp_path / "ok").name == edge_bundle.path.name


def test_a_model_without_a_program_is_refused_naming_why(edge_bundle) -> None:
    from signpost.stages.package import PackageError, package_edge

    trained = next((edge_bundle.config.workdir / "train").glob("t-*"))
    with pytest.raises(PackageError, match=r"has no model.pte \(it was not exported to ExecuTorch\)"):
        package_edge(edge_bundle.config, model=trained)


def test_cli_package_target_edge_reuses_a_signed_bundle_and_says_unsigned_ones_are_refused(
        edge_bundle, edge_keys, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from signpost.cli import main

    args = ["package", "--target", "edge", "--model", str(edge_bundle.model_dir), "name=t",
            f"workdir={edge_bundle.config.workdir}", "tracking.backend=none"]
    monkeypatch.setenv("SIGNPOST_SIGNING_KEY", edge_keys.private.read_text())
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"reused the edge bundle {edge_bundle.path}" in out
    assert f"tarball {edge_bundle.tarball} (" in out and " KiB)" in out and "signed;" in out
    monkeypatch.delenv("SIGNPOST_SIGNING_KEY")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "wrote the edge bundle" in out and "UNSIGNED" in out and "--allow-unsigned" in out
    assert str(edge_bundle.path) not in out  # another bundle: a signed one is never replaced by an unsigned one
    assert main([*args, "--build"]) == 2
    assert "--target edge writes a bundle" in capsys.readouterr().err
