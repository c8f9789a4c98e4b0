"""Runtimes: load any variant form, refuse tampered or pickled files, and never recompile on a new batch size."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from signpost.artifacts import ArtifactError
from signpost.models import build_model
from signpost.optimize.prune import prune_model
from signpost.optimize.quantize import quantize_int8
from signpost.runtime import ONNX, PROGRAM, RuntimeUnavailable, load_predictor, load_program


@pytest.mark.parametrize("name", ["fp32", "int8"])
def test_compiled_predictor_never_recompiles_when_the_batch_size_changes(optimized: dict, name: str) -> None:
    torch._dynamo.reset()
    predictor = load_predictor(optimized["result"].path / name, "compile", threads=2)  # warms up every regime
    graphs = counters["stats"]["unique_graphs"]
    eager = load_predictor(optimized["result"].path / name, "eager")
    for batch in (3, 64, 1, 256, 17, 2, 100):
        x = torch.randn(batch, 3, 32, 32)
        out = predictor(x)
        assert out.shape == (batch, 6)
        tolerance = 0.2 if name == "int8" else 1e-3
        assert torch.allclose(out, eager(x), atol=tolerance, rtol=0)
    assert counters["stats"]["unique_graphs"] == graphs, "a new batch size compiled a new graph"


@pytest.mark.parametrize("bf16", [False, True])
def test_compiled_predictor_normalizes_uint8_images_inside_its_graph(optimized: dict, bf16: bool) -> None:
    """As the server loads it: uint8 images [B, H, W, 3] in, the same logits as normalizing outside, no recompiles."""
    folder = optimized["result"].path / "fp32"
    torch._dynamo.reset()
    predictor = load_predictor(folder, "compile", threads=2, bf16=bf16, images=True)
    graphs = counters["stats"]["unique_graphs"]
    assert predictor.images is not None
    eager = load_predictor(folder, "eager")
    card = eager.card
    mean, std = torch.tensor(card.mean).view(1, 3, 1, 1), torch.tensor(card.std).view(1, 3, 1, 1)
    generator = torch.Generator().manual_seed(0)
    for batch in (5, 64, 1, 2):
        images = torch.randint(0, 256, (batch, 32, 32, 3), dtype=torch.uint8, generator=generator)
        expected = eager((images.permute(0, 3, 1, 2).float() / 255.0 - mean) / std)
        got = predictor.from_images(images)
        assert torch.allclose(got, expected, atol=0.15 if bf16 else 1e-3, rtol=0)
        assert torch.allclose(eager.from_images(images), expected, atol=1e-4, rtol=0)  # outside the graph
    assert counters["stats"]["unique_graphs"] == graphs, "a new batch size compiled a new graph"


def test_a_tampered_file_is_refused(optimized: dict, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(optimized["result"].path / "fp32", tmp_path / "fp32"))
    with open(folder / ONNX, "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ArtifactError, match="does not match its manifest"):
        load_predictor(folder, "onnxruntime")
    load_predictor(folder, "eager")  # the untouched forms still load


def test_a_program_archive_that_would_unpickle_is_refused(optimized: dict, tmp_path: Path) -> None:
    source = optimized["result"].path / "int8" / PROGRAM
    forged = tmp_path / "forged.pt2"
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(forged, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("weights_config.json"):
                config = json.loads(data)
                first = next(iter(config["config"]))
                config["config"][first]["use_pickle"] = True
                data = json.dumps(config).encode()
            dst.writestr(info.filename, data)
    with pytest.raises(ArtifactError, match="pickled; refusing"):
        load_program(forged)
    (tmp_path / "junk.pt2").write_bytes(b"not a zip at all")
    with pytest.raises(ArtifactError, match=r"not a plain torch\.export program"):
        load_program(tmp_path / "junk.pt2")


def test_missing_forms_and_unknown_runtimes_are_clear_errors(optimized: dict) -> None:
    with pytest.raises(RuntimeUnavailable, match=r"no model\.onnx: the onnxruntime runtime cannot load it"):
        load_predictor(optimized["result"].path / "int8", "onnxruntime")
    with pytest.raises(ValueError, match="unknown runtime 'tensorrt'"):
        load_predictor(optimized["result"].path / "fp32", "tensorrt")


@pytest.mark.parametrize("architecture", ["signnet", "traffic_sign_net"])
def test_pruning_that_keeps_every_channel_changes_nothing(architecture: str) -> None:
    torch.manual_seed(0)
    model = build_model(architecture, 43, 32).eval()
    for m in model.modules():  # non-trivial batch-norm statistics, so the copy of them is checked too
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    kept, options = prune_model(model, 0.001)  # rounds to keeping every channel, in a different object
    x = torch.randn(4, 3, 32, 32)
    assert torch.allclose(kept.eval()(x), model(x), atol=1e-5)
    assert options["widths"] == ([32, 48, 96, 128] if architecture == "signnet" else [32, 64, 128])


@pytest.mark.parametrize("architecture", ["signnet", "traffic_sign_net"])
def test_pruning_halves_the_widths_and_keeps_the_classes(architecture: str) -> None:
    model = build_model(architecture, 43, 32).eval()
    pruned, options = prune_model(model, 0.5)
    assert options["widths"] == ([16, 24, 48, 64] if architecture == "signnet" else [16, 32, 64])
    rebuilt = build_model(architecture, 43, 32, **options)
    rebuilt.load_state_dict(pruned.state_dict())  # the card's options rebuild exactly this shape
    assert pruned.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 43)
    with pytest.raises(ValueError, match="between 0 and 1"):
        prune_model(model, 1.0)


@pytest.mark.parametrize("architecture", ["signnet", "traffic_sign_net"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_int8_quantization_keeps_the_function(architecture: str, dynamic: bool) -> None:
    torch.manual_seed(0)
    model = build_model(architecture, 43, 32).eval()
    calibration = [torch.randn(16, 3, 32, 32) for _ in range(2)]
    program, settings = quantize_int8(model, calibration, torch.randn(2, 3, 32, 32), dynamic=dynamic)
    assert settings["scheme"] == ("dynamic" if dynamic else "static")
    assert settings["calibration_batches"] == (0 if dynamic else 2)
    x = calibration[0][:5]
    with torch.no_grad():
        expected, got = model(x), program.module()(x)
    assert got.shape == (5, 43)
    assert (got - expected).abs().max() < 0.1 * expected.abs().max()  # int8 rounding, not a different function
    if not dynamic:  # every max-pool runs on int8: its input is dequantized from a quantized conv + ReLU output
        pools = [n for n in program.graph.nodes if n.target is torch.ops.aten.max_pool2d.default]
        assert len(pools) == 2
        assert all("dequantize_per_tensor" in str(pool.args[0].target) for pool in pools)


def test_the_arm_quantizer_annotates_the_same_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """On arm64 runners quantize_int8 takes torchao's Arm Inductor quantizer; its annotation runs on any CPU."""
    import signpost.optimize.quantize as quantize

    monkeypatch.setattr(quantize, "quantizer_name", lambda: "arm_inductor")
    torch.manual_seed(0)
    model = build_model("signnet", 43, 32).eval()
    calibration = [torch.randn(16, 3, 32, 32)]
    program, settings = quantize.quantize_int8(model, calibration, torch.randn(2, 3, 32, 32))
    assert settings["quantizer"] == "arm_inductor"
    nodes = {str(node.target) for node in program.graph.nodes}
    assert any("quantize_per_tensor" in n for n in nodes)  # activations
    tensors = [*program.state_dict.values(), *program.constants.values()]
    assert any(t.dtype == torch.int8 and t.dim() == 4 for t in tensors)  # conv weights stored as int8
    x = calibration[0][:4]
    with torch.no_grad():
        assert (program.module()(x) - model(x)).abs().max() < 0.1 * model(x).abs().max()
