"""OpenVINO: every candidate within the budget gets an IR that scores like eager in a fresh process (int8 through
NNCF, within its budget); a tampered model.xml or model.bin is refused before OpenVINO reads it; a model OpenVINO
cannot convert is skipped with a reason."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from signpost.artifacts import ArtifactError, verify_artifact
from signpost.runtime import OV_BIN, OV_XML, available_runtimes, load_predictor


@pytest.fixture(autouse=True)
def _openvino_installed() -> None:
    # Found, not imported: importing openvino outside no_openvino_telemetry would send a usage event
    missing = [name for name in ("openvino", "nncf") if importlib.util.find_spec(name) is None]
    if missing:
        pytest.fail(f"{' and '.join(missing)} not installed: pip install -e '.[dev]' (or 'signpost[openvino]')")


def _rows(optimized: dict) -> dict[str, dict]:
    return {row.name: row.model_dump() for row in optimized["result"].variants}


def test_every_candidate_within_the_budget_has_an_fp32_or_int8_ir(optimized: dict) -> None:
    root, rows = optimized["result"].path, _rows(optimized)
    budget = optimized["config"].optimize.accuracy_budget
    expected = {"fp32": "fp32", "pruned": "fp32", "student": "fp32", "int8": "int8-static",
                "pruned-int8": "int8-static"}
    for name, precision in expected.items():
        assert "openvino" in rows[name]["forms"], rows[name]["settings"].get("openvino_error")
        verify_artifact(root / name, [OV_XML, OV_BIN])  # both listed in the variant's manifest with their hashes
        settings = rows[name]["settings"]["openvino"]
        assert settings["precision"] == precision and settings["weights"] == "fp32"
        assert "openvino" in available_runtimes(root / name)
    int8 = rows["int8"]["settings"]["openvino"]
    assert int8["quantizer"] == "nncf" and int8["calibration_batches"] == 2  # the fixture's int8 calibration
    assert rows["fp32"]["test_acc"] - int8["test_acc"] <= budget + 1e-9  # scored, and held to the budget
    assert (root / "int8" / OV_BIN).stat().st_size <= 0.35 * (root / "fp32" / OV_BIN).stat().st_size
    assert not (root / "student-alone" / OV_XML).exists()  # a control is never shipped: no exports


FRESH = textwrap.dedent("""
    import json, sys, torch
    from pathlib import Path
    from signpost.data.cache import load_split
    from signpost.data.loader import BatchLoader
    from signpost.runtime import load_predictor
    folder, data = Path(sys.argv[1]), Path(sys.argv[2])
    split = load_split(data / "test.safetensors")
    out = {}
    for runtime, bf16 in (("eager", False), ("openvino", False), ("openvino", True)):
        predictor = load_predictor(folder, runtime, bf16=bf16, threads=2, warmup=(1, 64))
        loader = BatchLoader(split.images, split.labels, 64, mean=predictor.card.mean, std=predictor.card.std,
                             shuffle=False)
        correct, logits = 0, []
        for x, y in loader:
            z = predictor(x)
            correct += int((z.argmax(1) == y).sum())
            logits.append(z)
        torch.manual_seed(0)  # batch 1 (LATENCY), 3 (too small to share out) and 64, 101 (THROUGHPUT, sliced)
        sizes = {str(b): predictor(torch.randn(b, 3, 32, 32)).tolist() for b in (1, 3, 64, 101)}
        out[runtime + ("-bf16" if bf16 else "")] = {"acc": correct / len(split), "logits": torch.cat(logits).tolist(),
                                                    "sizes": sizes, "form": predictor.form,
                                                    "settings": predictor.settings}
    out["training_code_loaded"] = any(m.startswith("signpost.stages") for m in sys.modules)
    print(json.dumps(out))
""")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fp32", "int8", "student"])
def test_the_ir_scores_like_eager_in_a_fresh_process(optimized: dict, name: str) -> None:
    folder = optimized["result"].path / name
    done = subprocess.run([sys.executable, "-c", FRESH, str(folder), str(optimized["data_dir"])],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["training_code_loaded"] is False
    eager, f32, bf16 = out["eager"], out["openvino"], out["openvino-bf16"]
    assert f32["form"] == "openvino"
    assert f32["settings"] | {"openvino": "?"} == {
        "device": "CPU", "inference_precision": "f32", "cpu_has_bf16": f32["settings"]["cpu_has_bf16"],
        "threads": 2, "batch_1": "LATENCY", "batches": "THROUGHPUT", "openvino": "?",
        "throughput_requests": f32["settings"]["throughput_requests"]}
    assert bf16["settings"]["inference_precision"] == ("bf16" if bf16["settings"]["cpu_has_bf16"] else "f32")
    for size, logits in f32["sizes"].items():
        assert len(logits) == int(size)
        # NNCF's int8 is its own quantization of the float parent, not the Inductor int8 program's
        tolerance = 0.5 if name == "int8" else 1e-3
        difference = (torch.tensor(logits) - torch.tensor(eager["sizes"][size])).abs().max()
        assert difference <= tolerance, (size, difference)
    if name == "int8":  # held to the variant's accuracy budget against fp32, like the variant itself
        parent = _rows(optimized)["fp32"]["test_acc"]
        for run in (f32, bf16):
            assert parent - run["acc"] <= optimized["config"].optimize.accuracy_budget + 1e-9
    else:
        assert torch.allclose(torch.tensor(f32["logits"]), torch.tensor(eager["logits"]), atol=1e-3, rtol=0)
        for run in (f32, bf16):  # within 0.5 points of eager, under either precision hint
            assert abs(run["acc"] - eager["acc"]) <= 0.005, (run["acc"], eager["acc"])
    print(name, "test accuracy: eager", eager["acc"], "openvino f32", f32["acc"], "bf16", bf16["acc"])  # with -s


def test_batch_1_alone_compiles_only_the_latency_model(optimized: dict) -> None:
    predictor = load_predictor(optimized["result"].path / "fp32", "openvino", warmup=(1,))
    assert predictor.settings["batches"] == "LATENCY" and predictor.settings["inference_precision"] == "f32"
    assert predictor(torch.zeros(7, 3, 32, 32)).shape == (7, 6)  # any batch still runs, on the one request


@pytest.mark.parametrize("name", [OV_XML, OV_BIN])
def test_a_tampered_ir_is_refused_before_it_is_read(optimized: dict, tmp_path: Path, name: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from signpost.runtime import no_openvino_telemetry

    with no_openvino_telemetry():
        import openvino
    folder = Path(shutil.copytree(optimized["result"].path / "fp32", tmp_path / "fp32"))
    data = bytearray((folder / name).read_bytes())
    data[len(data) // 2] ^= 0x01  # one byte changed
    (folder / name).write_bytes(bytes(data))
    loaded = []
    monkeypatch.setattr(openvino, "Core", lambda: loaded.append(1))
    with pytest.raises(ArtifactError, match=rf"{name.replace('.', '[.]')} does not match its manifest"):
        load_predictor(folder, "openvino")
    assert loaded == [], "OpenVINO saw the tampered IR"


def test_a_model_openvino_cannot_convert_is_skipped_with_a_reason(optimized: dict, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import signpost.stages.optimize as stage

    def cannot_convert(model: object, image_size: int, folder: Path, **kwargs: object) -> None:
        (folder / OV_XML).write_text("<net>")  # as a conversion that fails after it started writing
        raise RuntimeError("OpenVINO cannot convert aten.unknown_op")

    monkeypatch.setattr(stage, "write_openvino", cannot_convert)
    opt = optimized["config"].optimize  # only the fp32 variant, with no other exports: the quickest optimize run
    opt = opt.model_copy(update={"int8": False, "dynamic_int8": False, "export_aoti": False, "export_onnx": False,
                                 "prune": opt.prune.model_copy(update={"enabled": False}),
                                 "distill": opt.distill.model_copy(update={"enabled": False})})
    config = optimized["config"].model_copy(update={"workdir": tmp_path, "optimize": opt})
    result = stage.optimize(config, model_dir=optimized["model_dir"], data_dir=optimized["data_dir"], progress=False)
    (row,) = result.variants
    assert row.name == "fp32" and row.status == "ok" and "openvino" not in row.forms
    assert row.settings["openvino_error"] == "RuntimeError: OpenVINO cannot convert aten.unknown_op"
    assert not (result.path / "fp32" / OV_XML).exists()
    verify_artifact(result.path / "fp32")  # the variant's manifest matches what is there
    assert "openvino" not in available_runtimes(result.path / "fp32")
    assert load_predictor(result.path / "fp32", "eager")(torch.zeros(1, 3, 32, 32)).shape == (1, 6)



NO_TELEMETRY = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from openvino_telemetry.utils.sender import TelemetrySender
    sent = []
    TelemetrySender.send = lambda self, backend, message: sent.append(message)  # counts what would leave
    from signpost.models import build_model
    from signpost.optimize.openvino_export import write_openvino
    from signpost.runtime import OV_BIN, OV_XML, openvino_forward
    folder = Path(sys.argv[1])
    write_openvino(build_model("signnet", 6, 32), 32, folder, calibration=[torch.randn(4, 3, 32, 32)])
    forward, _ = openvino_forward((folder / OV_XML).read_bytes(), (folder / OV_BIN).read_bytes())
    print(len(sent), forward(torch.zeros(1, 3, 32, 32)).shape[1])
""")


def test_importing_converting_quantizing_and_loading_send_no_telemetry(tmp_path: Path) -> None:
    # A fresh process (not pytest, which NNCF detects and goes quiet in), as on a user's machine: outside CI, with no
    # opt-out file in the home folder. OpenVINO's tools would send usage events and write a client id there.
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "TF_BUILD", "JENKINS_URL", "NNCF_CI", "NNCF_DEV")}
    env["HOME"] = str(tmp_path / "home")  # it exists (telemetry declines when there is no home folder)
    (tmp_path / "home").mkdir()
    (tmp_path / "ir").mkdir()
    done = subprocess.run([sys.executable, "-c", NO_TELEMETRY, str(tmp_path / "ir")], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["0", "6"], "telemetry messages were sent (first figure)"
    assert not (tmp_path / "home" / "intel").exists(), "a telemetry client id was written to the home folder"
