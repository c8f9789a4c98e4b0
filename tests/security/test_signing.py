"""Signed artifacts: a manifest-consistent edit of a model (weights and their hash rewritten together) is refused
once a public key is configured, and so is an unsigned or foreign-signed model; ``--allow-unsigned`` lets an
unsigned one through, loudly, never a bad signature."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from signpost import signing
from signpost.artifacts import ArtifactError, hash_file, write_manifest
from signpost.cli import main
from signpost.models import build_model
from signpost.models.artifact import WEIGHTS, ModelCard, load_model, save_model
from signpost.runtime import load_predictor


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("keys")
    private, public = signing.generate(out, "team")
    other_private, other_public = signing.generate(out, "other")
    return {"private": private, "public": public, "other_private": other_private, "other_public": other_public}


def _use(signing_key: Path | None = None, *public: Path, allow_unsigned: bool = False) -> None:
    signing.configure(signing.policy_from(signing_key, list(public), allow_unsigned))


def _model(folder: Path) -> Path:
    """A small model artifact made the way train makes one (weights, card, manifest written last)."""
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    model = build_model("signnet", 4, 16)
    card = ModelCard(architecture="signnet", num_classes=4, class_names=list("abcd"), image_size=16,
                     mean=[0.5] * 3, std=[0.25] * 3, data_artifact="d", data_key="k")
    save_model(folder, model, card)
    write_manifest(folder, stage="train", key="model-key", inputs={}, config={}, code="c")
    return folder


def _tamper(folder: Path) -> None:
    """Change the weights and rewrite their hash in the manifest: what anyone who can write the folder can do."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / WEIGHTS))
    first = next(iter(state))
    state[first] = state[first] + 1.0
    save_file(state, str(folder / WEIGHTS), metadata={"architecture": "signnet"})
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][WEIGHTS] = hash_file(folder / WEIGHTS)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def test_keys_generate_writes_a_private_key_only_its_owner_reads_and_never_overwrites(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keys", "generate", "--out", str(tmp_path / "k")]) == 0
    private, public = tmp_path / "k" / "signpost.key", tmp_path / "k" / "signpost.pub"
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
    assert b"BEGIN PRIVATE KEY" in private.read_bytes() and b"BEGIN PUBLIC KEY" in public.read_bytes()
    assert "key id" in capsys.readouterr().out
    before = private.read_bytes()
    assert main(["keys", "generate", "--out", str(tmp_path / "k")]) == 1
    assert "exists; refusing to overwrite a key" in capsys.readouterr().err
    assert private.read_bytes() == before


def test_a_signed_model_loads_and_a_manifest_consistent_edit_is_refused(keys: dict, tmp_path: Path) -> None:
    _use(keys["private"], keys["public"])
    folder = _model(tmp_path / "train" / "m")
    assert (folder / signing.SIGNATURE).is_file()
    load_model(folder)
    load_predictor(folder, "eager")
    _tamper(folder)
    with pytest.raises(ArtifactError, match="the signature does not match its manifest"):
        load_model(folder)
    with pytest.raises(ArtifactError, match="the signature does not match its manifest"):
        load_predictor(folder, "eager")
    _use(None, keys["public"], allow_unsigned=True)  # --allow-unsigned never excuses a bad signature
    with pytest.raises(ArtifactError, match="the signature does not match its manifest"):
        load_model(folder)


def test_without_a_public_key_the_tampered_model_would_load(keys: dict, tmp_path: Path) -> None:
    """The attack is real: hashes alone accept the edit (what the signature check stops above)."""
    _use(keys["private"])
    folder = _model(tmp_path / "train" / "m")
    _tamper(folder)
    _use()
    load_model(folder)


def test_unsigned_and_foreign_signed_models_are_refused(keys: dict, tmp_path: Path) -> None:
    unsigned = _model(tmp_path / "unsigned")
    _use(keys["other_private"])
    foreign = _model(tmp_path / "foreign")
    _use(None, keys["public"])
    with pytest.raises(ArtifactError, match=r"is not signed \(no manifest\.sig\) and a public key is configured"):
        load_predictor(unsigned, "eager")
    with pytest.raises(ArtifactError, match="which is not trusted here"):
        load_predictor(foreign, "eager")
    _use(None, keys["public"], keys["other_public"])  # both trusted, as while rotating keys
    load_predictor(foreign, "eager")
    _use(None, keys["public"], allow_unsigned=True)
    load_predictor(unsigned, "eager")


@pytest.mark.parametrize("command", [["serve"], ["evaluate"], ["package"]])
def test_the_cli_refuses_an_unsigned_model_in_one_line_and_allow_unsigned_says_so(
    keys: dict, tmp_path: Path, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _model(tmp_path / "work" / "train" / "m")
    common = ["--model", str(folder), f"workdir={tmp_path / 'work'}", "tracking.backend=none",
              f"security.public_keys=[{keys['public']}]"]
    assert main([*command, *common]) == 1
    err = capsys.readouterr().err
    assert "is not signed (no manifest.sig) and a public key is configured" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    if command == ["package"]:  # gets past the signature and writes the context
        assert main([*command, *common, "--allow-unsigned"]) == 0
        assert "--allow-unsigned: unsigned models will be loaded" in capsys.readouterr().err


def test_a_signature_file_is_bounded_and_parsed_strictly(keys: dict, tmp_path: Path) -> None:
    _use(keys["private"], keys["public"])
    folder = _model(tmp_path / "m")
    (folder / signing.SIGNATURE).write_text("x" * 10_000)
    with pytest.raises(ArtifactError, match="not a Signpost signature file"):
        load_model(folder)
    (folder / signing.SIGNATURE).write_text(json.dumps({"algorithm": "rsa", "key_id": "x", "signature": ""}))
    with pytest.raises(ArtifactError, match="algorithm 'rsa' is not ed25519"):
        load_model(folder)


def test_the_package_carries_the_public_key_and_never_the_private_one(keys: dict, tmp_path: Path) -> None:
    from signpost.config import load_config
    from signpost.stages.package import package

    workdir = tmp_path / "work"
    config = load_config(None, [f"workdir={workdir}", "tracking.backend=none",
                                f"security.signing_key={keys['private']}"])
    signing.configure_from(config.security)
    folder = _model(workdir / "train" / "m")
    result = package(config, model=folder)
    context = result.context
    trusted = signing.load_public_keys((context / "keys" / "trusted.pub").read_bytes(), "trusted.pub")
    assert set(trusted) == set(signing.load_public_keys(keys["public"].read_bytes(), "team.pub"))
    server = (context / "signpost.yaml").read_text()
    assert "/etc/signpost/keys/trusted.pub" in server and str(keys["private"]) not in server
    assert not list(context.rglob("*.key")) and b"PRIVATE" not in b"".join(
        p.read_bytes() for p in context.rglob("*") if p.is_file() and p.suffix in (".pub", ".yaml", ""))
    assert "COPY keys /etc/signpost/keys" in (context / "Dockerfile").read_text()
    # The model in the image is the signed one, and the image's own config verifies it.
    signing.configure_from(load_config(context / "signpost.yaml").security.model_copy(
        update={"public_keys": [context / "keys" / "trusted.pub"]}))
    load_model(context / "model")
    (context / "model" / signing.SIGNATURE).unlink()
    with pytest.raises(ArtifactError, match="is not signed"):
        load_model(context / "model")


def test_a_process_that_signs_checks_what_it_loads(keys: dict, tmp_path: Path) -> None:
    """CI jobs hold the signing key only: the models they hand each other are still checked."""
    unsigned = _model(tmp_path / "unsigned")
    _use(keys["private"])
    signed = _model(tmp_path / "signed")
    load_model(signed)
    with pytest.raises(ArtifactError, match="is not signed"):
        load_model(unsigned)
