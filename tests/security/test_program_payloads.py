"""A tampered ``program.pt2`` cannot run code: every archive shape ``torch.export.load`` reads is tried with a pickle
payload that would create a marker file, and the marker must never appear.

Each payload is first shown to run under a plain ``torch.export.load`` (so the test would fail if Signpost's loader
simply called it), then refused by ``load_program`` and by ``load_predictor`` on a folder whose manifest matches the
tampered file (the attacker rewrote the hash too; signatures are the next line of defence, tested elsewhere).
"""

from __future__ import annotations

import builtins
import io
import json
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from signpost.artifacts import ArtifactError, write_manifest
from signpost.models.artifact import CARD
from signpost.optimize.quantize import save_program
from signpost.runtime import PROGRAM, load_predictor, load_program


class _Payload:
    """Unpickling this creates ``marker``: the stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return builtins.open, (str(self.marker), "w")


def _pickled(marker: Path, wrap: Callable[[object], object] = lambda p: p) -> bytes:
    buffer = io.BytesIO()
    torch.save(wrap(_Payload(marker)), buffer)
    return buffer.getvalue()


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.register_buffer("offset", torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean((2, 3)) + self.offset


@pytest.fixture(scope="module")
def clean_program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A program written the way Signpost writes one (``save_program``)."""
    path = tmp_path_factory.mktemp("program") / PROGRAM
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(_Tiny().eval(), (torch.zeros(2, 3, 8, 8),), dynamic_shapes=({0: batch},))
    save_program(program, path)
    return path


def _entries(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {info.filename: archive.read(info.filename) for info in archive.infolist()}


def _write(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return path


def _top(entries: dict[str, bytes]) -> str:
    return next(iter(entries)).split("/", 1)[0]


def _mark_pickled(entries: dict[str, bytes], config: str, marker: Path, prefix: str) -> dict[str, bytes]:
    """Mark the first payload of ``config`` as pickled and put the payload in its file."""
    top = _top(entries)
    table = json.loads(entries[f"{top}/{config}"])
    if not table["config"]:  # the constants table of a model without constants: add one
        table["config"]["evil"] = {"path_name": f"{prefix}0", "is_param": False, "use_pickle": True,
                                   "tensor_meta": None}
    first = next(iter(table["config"]))
    table["config"][first]["use_pickle"] = True
    folder = config.rsplit("/", 1)[0]
    entries[f"{top}/{config}"] = json.dumps(table).encode()
    entries[f"{top}/{folder}/{table['config'][first]['path_name']}"] = _pickled(marker)
    return entries


def _pickled_weight(entries: dict[str, bytes], marker: Path) -> dict[str, bytes]:
    return _mark_pickled(entries, "data/weights/model_weights_config.json", marker, "weight_")


def _pickled_constant(entries: dict[str, bytes], marker: Path) -> dict[str, bytes]:
    return _mark_pickled(entries, "data/constants/model_constants_config.json", marker, "tensor_")


def _legacy_weights(entries: dict[str, bytes], marker: Path) -> dict[str, bytes]:
    entries[f"{_top(entries)}/data/weights/model.pt"] = _pickled(marker)
    return entries


def _legacy_constants(entries: dict[str, bytes], marker: Path) -> dict[str, bytes]:
    entries[f"{_top(entries)}/data/constants/model.pt"] = _pickled(marker)
    return entries


def _sample_inputs(entries: dict[str, bytes], marker: Path) -> dict[str, bytes]:
    # weights-only loading fails on the payload, and torch retries with a full unpickle
    entries[f"{_top(entries)}/data/sample_inputs/model.pt"] = _pickled(marker, lambda p: ((p,), {}))
    return entries


def _opaque_constant(entries: dict[str, bytes], marker: Path) -> dict[str, bytes]:
    import pickle

    top = _top(entries)
    config = f"{top}/data/constants/model_constants_config.json"
    table = json.loads(entries[config])
    table["config"]["evil"] = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True,
                               "tensor_meta": None}
    entries[config] = json.dumps(table).encode()
    entries[f"{top}/data/constants/opaque_obj_0"] = pickle.dumps(_Payload(marker))
    return entries


def _pre_2_8_layout(entries: dict[str, bytes], marker: Path) -> dict[str, bytes]:
    """The zip layout of torch 2.7 and before: a ``version`` file and pickled JSON-named state at the root."""
    from torch._export.serde.schema import SCHEMA_VERSION

    top = _top(entries)
    return {
        "version": ".".join(map(str, SCHEMA_VERSION)).encode(),
        "serialized_exported_program.json": entries[f"{top}/models/model.json"],
        "serialized_state_dict.pt": _pickled(marker),
        "serialized_constants.pt": _pickled(marker),
        "serialized_example_inputs.pt": _pickled(marker),
    }


def _aotinductor_entry(entries: dict[str, bytes], marker: Path) -> dict[str, bytes]:
    """An AOTInductor model inside the program archive: torch would dlopen its shared library."""
    entries[f"{_top(entries)}/data/aotinductor/model/model.so"] = b"\x7fELF not really"
    return entries


SHAPES: dict[str, Callable[[dict[str, bytes], Path], dict[str, bytes]]] = {
    "pickled weight": _pickled_weight,
    "pickled constant": _pickled_constant,
    "legacy weights file": _legacy_weights,
    "legacy constants file": _legacy_constants,
    "sample inputs": _sample_inputs,
    "opaque object constant": _opaque_constant,
    "pre-2.8 zip layout": _pre_2_8_layout,
}
# Shapes whose payload a plain torch.export.load runs (checked below, so these tests can fail).
LIVE = {"pickled weight", "pickled constant", "legacy weights file", "legacy constants file", "sample inputs",
        "opaque object constant", "pre-2.8 zip layout"}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_a_payload_in_any_entry_shape_never_runs(shape: str, clean_program: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    forged = _write(tmp_path / "forged.pt2", SHAPES[shape](_entries(clean_program), marker))
    if shape in LIVE:  # the payload is real: torch's own loader runs it
        with pytest.raises(Exception):  # noqa: B017 - torch may or may not fail after running it
            torch.export.load(str(forged)).module()
        if marker.exists():
            marker.unlink()
        else:
            pytest.fail(f"the {shape} payload did not run under torch.export.load: the test would prove nothing")
    with pytest.raises(ArtifactError, match=r"refusing|never writes|carries sample inputs|one folder"):
        load_program(forged)
    assert not marker.exists(), f"the {shape} payload ran inside load_program"


def test_native_code_and_duplicate_entries_are_refused_by_name(clean_program: Path, tmp_path: Path) -> None:
    forged = _write(tmp_path / "aoti.pt2", _aotinductor_entry(_entries(clean_program), tmp_path / "x"))
    with pytest.raises(ArtifactError, match=r"never writes: .*data/aotinductor/model/model\.so"):
        load_program(forged)
    entries = _entries(clean_program)
    doubled = tmp_path / "doubled.pt2"
    with zipfile.ZipFile(doubled, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
        name = next(n for n in entries if n.endswith("weights/weight_0"))
        with pytest.warns(UserWarning, match="Duplicate name"):
            archive.writestr(name, entries[name])
    with pytest.raises(ArtifactError, match="names an entry twice"):
        load_program(doubled)


def test_a_clean_program_still_loads(clean_program: Path) -> None:
    module = load_program(clean_program)
    x = torch.randn(3, 3, 8, 8)
    assert torch.allclose(module(x), _reference(clean_program)(x))


def _reference(path: Path) -> torch.nn.Module:
    return torch.export.load(str(path)).module()


@pytest.mark.parametrize("shape", ["pickled weight", "legacy weights file", "sample inputs"])
def test_load_predictor_refuses_a_manifest_consistent_payload(
    shape: str, clean_program: Path, tmp_path: Path
) -> None:
    """The attacker rewrote the program and its manifest hash: the archive check still refuses it."""
    from signpost.models.artifact import ModelCard

    marker = tmp_path / "pwned"
    folder = tmp_path / "int8"
    folder.mkdir()
    _write(folder / PROGRAM, SHAPES[shape](_entries(clean_program), marker))
    card = ModelCard(architecture="signnet", num_classes=4, class_names=[str(i) for i in range(4)], image_size=8,
                     mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], data_artifact="d", data_key="k")
    (folder / CARD).write_text(card.model_dump_json(), encoding="utf-8")
    write_manifest(folder, stage="optimize", key="k", inputs={}, config={}, code="c")
    with pytest.raises(ArtifactError, match=r"refusing|never writes|carries sample inputs"):
        load_predictor(folder, "eager")
    assert not marker.exists()
