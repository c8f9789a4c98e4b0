"""optimize: every variant is an artifact with its accuracy, loads in a fresh process, and is held to the budget."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from signpost.artifacts import read_manifest, verify_artifact
from signpost.cli import main
from signpost.models.artifact import WEIGHTS, load_model
from signpost.optimize import variant_folders
from signpost.runtime import AOTI, AOTI_BF16, ONNX, PROGRAM, available_runtimes
from signpost.stages.optimize import Variant, _apply_budget, optimize


def _rows(optimized: dict) -> dict[str, dict]:
    return {row.name: row.model_dump() for row in optimized["result"].variants}


def test_every_variant_is_made_and_recorded(optimized: dict) -> None:
    rows = _rows(optimized)
    assert list(rows) == ["fp32", "int8", "dynamic-int8", "pruned", "pruned-int8", "student", "student-alone"]
    assert rows["dynamic-int8"]["status"] == "skipped" and "Linear" in rows["dynamic-int8"]["reason"]
    made = dict((row.name, folder) for row, folder in variant_folders(optimized["result"].path))
    assert set(made) == {"fp32", "int8", "pruned", "pruned-int8", "student", "student-alone"}
    for name, folder in made.items():
        manifest = verify_artifact(folder)  # every file matches its hash
        row = rows[name]
        assert manifest["config"]["method"] == row["method"]
        assert 0.0 <= manifest["metrics"]["val_acc"] <= 1.0 and 0.0 <= manifest["metrics"]["test_acc"] <= 1.0
        assert row["size_bytes"] > 0 and row["mflops"] > 0
        assert manifest["within_budget"] is True and manifest["accuracy_budget"] == 1.0  # the fixture's budget
    assert rows["int8"]["settings"]["scheme"] == "static"
    assert rows["int8"]["settings"]["calibration_batches"] == 2
    assert rows["pruned"]["settings"]["ratio"] == 0.5 and rows["pruned"]["settings"]["widths"] == [16, 24, 48, 64]
    assert rows["student"]["settings"]["temperature"] == 4.0 and rows["student-alone"]["role"] == "control"
    # The stage's own manifest lists the same table.
    assert read_manifest(optimized["result"].path)["variants"] == [v.model_dump() for v in optimized["result"].variants]


def test_int8_file_is_at_most_30_percent_of_fp32(optimized: dict) -> None:
    root = optimized["result"].path
    fp32, int8 = (root / "fp32" / WEIGHTS).stat().st_size, (root / "int8" / PROGRAM).stat().st_size
    assert int8 <= 0.30 * fp32, (int8, fp32)


def test_pruning_removes_channels_physically(optimized: dict) -> None:
    parent, _ = load_model(optimized["model_dir"])
    pruned, card = load_model(optimized["result"].path / "pruned")
    assert card.architecture_options == {"widths": [16, 24, 48, 64]}
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(pruned) < 0.35 * count(parent)
    rows = _rows(optimized)
    assert rows["pruned"]["mflops"] < 0.35 * rows["fp32"]["mflops"]


def test_exports_exist_for_the_float_and_int8_candidates(optimized: dict) -> None:
    root = optimized["result"].path
    for name in ("fp32", "pruned", "student"):
        assert all((root / name / form).is_file() for form in (AOTI, AOTI_BF16, ONNX))
        assert available_runtimes(root / name) == ["eager", "compile", "aoti", "onnxruntime", "executorch",
                                                   "openvino"]
    assert (root / "int8" / AOTI).is_file()
    assert available_runtimes(root / "int8") == ["eager", "compile", "aoti", "executorch", "openvino"]
    assert not (root / "int8" / AOTI_BF16).exists()  # bf16 packages are made from float modules only
    assert available_runtimes(root / "student-alone") == ["eager", "compile"]  # a control gets no exports


FRESH = textwrap.dedent("""
    import json, sys, torch
    from pathlib import Path
    from signpost.runtime import load_predictor
    folder, runtimes = Path(sys.argv[1]), sys.argv[2].split(",")
    torch.manual_seed(0)
    x = torch.randn(5, 3, 32, 32)
    out = {}
    for runtime in runtimes:
        p = load_predictor(folder, runtime.removesuffix("+bf16"), threads=1, bf16=runtime.endswith("+bf16"))
        out[runtime] = p(x).tolist()
        out[runtime + " form"] = p.form
    out["training_code_loaded"] = any(m.startswith("signpost.stages") for m in sys.modules)
    print(json.dumps(out))
""")


@pytest.mark.parametrize("name", ["fp32", "int8", "pruned", "pruned-int8", "student"])
def test_each_variant_loads_and_predicts_in_a_fresh_process(optimized: dict, name: str) -> None:
    folder = optimized["result"].path / name
    # compile: see test_runtime.py; executorch and openvino (their int8 is XNNPACK's and NNCF's own quantization, so
    # it is compared on images, not noise): see tests/optimize/test_executorch.py and test_openvino.py
    runtimes = [r for r in available_runtimes(folder) if r not in ("compile", "executorch", "openvino")]
    runtimes.append("aoti+bf16")  # the bf16 package where the variant has one, else the fp32 one
    done = subprocess.run([sys.executable, "-c", FRESH, str(folder), ",".join(runtimes)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out.pop("training_code_loaded") is False
    forms = {runtime: out.pop(f"{runtime} form") for runtime in runtimes}
    assert forms["aoti+bf16"] == ("aoti" if "int8" in name else "aoti_bf16")
    logits = {runtime: torch.tensor(values) for runtime, values in out.items()}
    assert all(v.shape == (5, 6) for v in logits.values())
    reference = logits["eager"]
    for runtime, value in logits.items():  # every form of a variant computes the same function
        tolerance = 0.15 if "int8" in name or "bf16" in runtime else 1e-3
        assert torch.allclose(value, reference, atol=tolerance, rtol=0), (runtime, (value - reference).abs().max())


def test_budget_rejects_a_candidate_that_loses_too_much() -> None:
    parent = Variant("fp32", "fp32", {}, val_acc=0.98, test_acc=0.97)
    close = Variant("int8", "int8-static", {}, val_acc=0.979, test_acc=0.966)
    far = Variant("pruned", "structured-pruning", {}, val_acc=0.97, test_acc=0.96)
    control = Variant("student-alone", "student-baseline", {}, val_acc=0.5, test_acc=0.5, role="control")
    _apply_budget([parent, close, far, control], parent, budget=0.005)
    assert close.status == "ok" and close.settings["test_drop"] == pytest.approx(0.004)
    assert far.status == "rejected" and "loses 1.00 points" in far.reason and "accuracy_budget" in far.reason
    assert control.status == "ok"  # a control is a comparison, never shipped: the budget does not apply


def test_a_second_run_reuses_the_variants(optimized: dict) -> None:
    again = optimize(optimized["config"], model_dir=optimized["model_dir"], data_dir=optimized["data_dir"],
                     progress=False)
    assert again.reused and again.path == optimized["result"].path and again.variants == optimized["result"].variants


def test_cli_optimize_prints_the_table(optimized: dict, capsys: pytest.CaptureFixture[str]) -> None:
    config = optimized["config"]
    args = [f"{k}={v}" for k, v in (("data.source", "local"), ("data.root", config.data.root),
                                    ("workdir", config.workdir), ("name", config.name))]
    overrides = ["train.epochs=4", "train.batch_size=16", "train.warmup_epochs=0.5", "optimize.prune.finetune_epochs=1",
                 "optimize.distill.epochs=2", "optimize.calibration_batches=2", "optimize.calibration_batch_size=16",
                 "optimize.accuracy_budget=1.0", "tracking.backend=none"]
    code = main(["optimize", "--model", str(optimized["model_dir"]), *args, *overrides])
    out = capsys.readouterr().out
    assert code == 0
    assert f"optimize: reused {optimized['result'].path}" in out
    assert "pruned-int8" in out and "control" in out


def test_cli_optimize_without_a_model_says_what_to_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["optimize", f"workdir={tmp_path}", "tracking.backend=none"])
    assert code == 1
    assert "run `signpost train` first" in capsys.readouterr().err


def test_a_candidate_over_the_budget_gets_no_exported_forms(optimized: dict) -> None:
    from signpost.stages.optimize import _VariantMaker

    maker = object.__new__(_VariantMaker)  # only the budget check is exercised: no data, no training
    maker.config = optimized["config"].model_copy(
        update={"optimize": optimized["config"].optimize.model_copy(update={"accuracy_budget": 0.01})}
    )
    maker.parent_test_acc = 0.95
    assert maker._within_budget(Variant("a", "m", {}, test_acc=0.945))
    assert not maker._within_budget(Variant("b", "m", {}, test_acc=0.93))
    maker.parent_test_acc = None  # the fp32 parent itself, scored first
    assert maker._within_budget(Variant("fp32", "fp32", {}, test_acc=0.5))
