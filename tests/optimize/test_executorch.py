"""ExecuTorch: every candidate within the budget gets an XNNPACK .pte that scores like eager in a fresh process; a
tampered program is refused before it is read; a model ExecuTorch cannot lower is skipped with a reason."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from signpost.artifacts import ArtifactError, verify_artifact
from signpost.runtime import PTE, available_runtimes, load_predictor


@pytest.fixture(autouse=True)
def _executorch_installed() -> None:
    try:
        import executorch.runtime  # noqa: F401
    except ImportError as exc:
        pytest.fail(f"executorch is not installed ({exc}): pip install -e '.[dev]' (or 'signpost[executorch]')")


def _rows(optimized: dict) -> dict[str, dict]:
    return {row.name: row.model_dump() for row in optimized["result"].variants}


def test_every_candidate_within_the_budget_has_fp32_or_int8_programs(optimized: dict) -> None:
    root, rows = optimized["result"].path, _rows(optimized)
    expected = {"fp32": "fp32", "pruned": "fp32", "student": "fp32", "int8": "int8-static",
                "pruned-int8": "int8-static"}
    for name, precision in expected.items():
        assert "executorch" in rows[name]["forms"], rows[name]["settings"].get("executorch_error")
        assert (root / name / PTE).is_file()
        verify_artifact(root / name, [PTE])  # listed in the variant's manifest with its hash
        settings = rows[name]["settings"]["executorch"]
        assert settings["delegate"] == "xnnpack" and settings["precision"] == precision
        # scored on the program itself at optimize time, and held to the budget against fp32
        assert rows["fp32"]["test_acc"] - settings["test_acc"] <= optimized["config"].optimize.accuracy_budget
        if precision == "fp32":
            assert settings["test_acc"] == pytest.approx(rows[name]["test_acc"], abs=0.005)
        assert "executorch" in available_runtimes(root / name)
    assert rows["int8"]["settings"]["executorch"]["calibration_batches"] == 2  # the fixture's int8 calibration
    assert (root / "int8" / PTE).stat().st_size <= 0.35 * (root / "fp32" / PTE).stat().st_size
    assert not (root / "student-alone" / PTE).exists()  # a control is never shipped: no exports


FRESH = textwrap.dedent("""
    import json, sys, torch
    from pathlib import Path
    from signpost.data.cache import load_split
    from signpost.data.loader import BatchLoader
    from signpost.runtime import load_predictor
    folder, data = Path(sys.argv[1]), Path(sys.argv[2])
    split = load_split(data / "test.safetensors")
    out = {}
    for runtime in ("eager", "executorch"):
        predictor = load_predictor(folder, runtime, threads=1)
        loader = BatchLoader(split.images, split.labels, 64, mean=predictor.card.mean, std=predictor.card.std,
                             shuffle=False)
        correct, logits, images = 0, [], []
        for x, y in loader:
            z = predictor(x)
            correct += int((z.argmax(1) == y).sum())
            logits.append(z)
            images.append(x)
        # Test images repeated up to 100 (int8 is calibrated on images, not noise), 1 to 100 a batch: each method
        # of the program, and a batch split into chunks.
        pool = torch.cat(images).repeat(100, 1, 1, 1)[:100]
        sizes = {str(b): predictor(pool[:b]).tolist() for b in (1, 2, 15, 16, 17, 33, 64, 100)}
        out[runtime] = {"acc": correct / len(split), "logits": torch.cat(logits).tolist(), "sizes": sizes,
                        "form": predictor.form}
    out["training_code_loaded"] = any(m.startswith("signpost.stages") for m in sys.modules)
    print(json.dumps(out))
""")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fp32", "int8", "pruned-int8", "student"])
def test_the_program_scores_like_eager_in_a_fresh_process(optimized: dict, name: str) -> None:
    folder = optimized["result"].path / name
    done = subprocess.run([sys.executable, "-c", FRESH, str(folder), str(optimized["data_dir"])],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["training_code_loaded"] is False
    assert out["executorch"]["form"] == "executorch"
    eager, pte = out["eager"], out["executorch"]
    for size, logits in pte["sizes"].items():
        assert len(logits) == int(size)
        # XNNPACK's int8 is its own quantization of the float parent, not the Inductor int8 program's
        tolerance = 0.15 if "int8" in name else 1e-3
        difference = (torch.tensor(logits) - torch.tensor(eager["sizes"][size])).abs().max()
        assert difference <= tolerance, (size, difference)
    if "int8" in name:  # held to the variant's accuracy budget against fp32, like the variant itself
        parent = _rows(optimized)["fp32"]["test_acc"]
        assert parent - pte["acc"] <= optimized["config"].optimize.accuracy_budget + 1e-9
    else:
        assert abs(pte["acc"] - eager["acc"]) <= 0.005, (pte["acc"], eager["acc"])
        assert torch.allclose(torch.tensor(pte["logits"]), torch.tensor(eager["logits"]), atol=1e-3, rtol=0)
    print(name, "test accuracy: eager", eager["acc"], "executorch", pte["acc"])  # shown with -s


def test_a_tampered_program_is_refused_before_it_is_read(optimized: dict, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import executorch.runtime

    folder = Path(shutil.copytree(optimized["result"].path / "fp32", tmp_path / "fp32"))
    data = bytearray((folder / PTE).read_bytes())
    data[len(data) // 2] ^= 0x01  # one byte changed
    (folder / PTE).write_bytes(bytes(data))
    loaded = []
    monkeypatch.setattr(executorch.runtime.Runtime, "get", staticmethod(lambda: loaded.append(1)))
    with pytest.raises(ArtifactError, match=r"model\.pte does not match its manifest"):
        load_predictor(folder, "executorch")
    assert loaded == [], "the runtime saw the tampered program"


def test_a_model_executorch_cannot_lower_is_skipped_with_a_reason(optimized: dict, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import signpost.stages.optimize as stage

    def cannot_lower(*args: object, **kwargs: object) -> None:
        Path(args[2]).write_bytes(b"half a program")  # as a lowering that fails after it started writing
        raise RuntimeError("XNNPACK cannot lower aten.unknown_op")

    monkeypatch.setattr(stage, "write_executorch", cannot_lower)
    opt = optimized["config"].optimize  # only the fp32 variant, with no other exports: the quickest optimize run
    opt = opt.model_copy(update={"int8": False, "dynamic_int8": False, "export_aoti": False, "export_onnx": False,
                                 "prune": opt.prune.model_copy(update={"enabled": False}),
                                 "distill": opt.distill.model_copy(update={"enabled": False})})
    config = optimized["config"].model_copy(update={"workdir": tmp_path, "optimize": opt})
    result = stage.optimize(config, model_dir=optimized["model_dir"], data_dir=optimized["data_dir"], progress=False)
    (row,) = result.variants
    assert row.name == "fp32" and row.status == "ok" and "weights" in row.forms and "executorch" not in row.forms
    assert row.settings["executorch_error"] == "RuntimeError: XNNPACK cannot lower aten.unknown_op"
    assert not (result.path / "fp32" / PTE).exists()
    verify_artifact(result.path / "fp32")  # the variant's manifest matches what is there
    assert "executorch" not in available_runtimes(result.path / "fp32")
    assert load_predictor(result.path / "fp32", "eager")(torch.zeros(1, 3, 32, 32)).shape == (1, 6)


def test_the_export_switches_turn_the_executorch_and_openvino_forms_off(optimized: dict, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """optimize.export_executorch=false and export_openvino=false (the workflow tests' lean optimize): neither
    exporter runs, and the variant records no error for a form nobody asked for."""
    import signpost.stages.optimize as stage

    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("an export that was switched off ran")

    monkeypatch.setattr(stage, "write_executorch", must_not_run)
    monkeypatch.setattr(stage, "write_openvino", must_not_run)
    opt = optimized["config"].optimize
    opt = opt.model_copy(update={"int8": False, "dynamic_int8": False, "export_aoti": False, "export_onnx": False,
                                 "export_executorch": False, "export_openvino": False,
                                 "prune": opt.prune.model_copy(update={"enabled": False}),
                                 "distill": opt.distill.model_copy(update={"enabled": False})})
    config = optimized["config"].model_copy(update={"workdir": tmp_path, "optimize": opt})
    result = stage.optimize(config, model_dir=optimized["model_dir"], data_dir=optimized["data_dir"], progress=False)
    (row,) = result.variants
    assert row.status == "ok" and not {"executorch", "openvino"} & set(row.forms)
    assert not {"executorch_error", "openvino_error"} & set(row.settings)
    assert not (result.path / "fp32" / PTE).exists()
