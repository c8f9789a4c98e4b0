"""A kill at any point of a checkpoint write loses nothing, and --resume continues exactly (issue 13, item 4).

A child process trains a tiny model and SIGKILLs itself at the k-th file-system call (``os.open``, ``os.write``,
``os.fsync``, ``os.replace``, ...) of one checkpoint write, for every k, right after the write returns, and, at
each ``os.write``, after writing half its bytes (a torn write). The children are forked from one interpreter that
imported torch once (the import is most of a child's time) and ran nothing. After each kill the checkpoint on disk
must be the previous epoch's or the new one, whole (weights, optimizer, RNG and progress from the same epoch), and
resuming from it must end with the same weights and history as an uninterrupted run. A damaged or old-layout
checkpoint is refused with a one-line error that names the fix, and left as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from signpost.cli import main
from signpost.config import SignpostConfig, load_config
from signpost.models.artifact import unwrap
from signpost.stages.prepare import prepare
from signpost.stages.train import train
from signpost.training import CHECKPOINT, Recipe

# As tests/stages/test_train.py: one thread, so that a resumed run can match an uninterrupted one bit for bit.
TRAIN = ["train.batch_size=16", "train.epochs=3", "train.threads=1", "train.warmup_epochs=0.5"]
# The os calls a checkpoint write may make; those made inside Recipe._save_checkpoint are counted and interrupted.
CALLS = ("open", "write", "fsync", "fdatasync", "close", "replace", "rename", "link", "unlink", "mkdir", "rmdir",
         "ftruncate", "truncate")


def _overrides(workdir: Path) -> list[str]:
    return ["data.source=local", f"data.root={workdir / 'unused'}", f"workdir={workdir}", "name=t",
            "tracking.backend=none", *TRAIN]


def _fingerprint(recipe: Recipe) -> dict[str, Any]:
    """What a checkpoint restores, comparable across processes: the progress as is, the tensors as one SHA-256."""
    optimizer = recipe.optimizer.state_dict()
    tensors = {f"model.{k}": v for k, v in unwrap(recipe.model).state_dict().items()}
    tensors |= {f"optim.{i}.{k}": v for i, s in optimizer["state"].items() for k, v in s.items()}
    tensors |= {"rng.cpu": torch.get_rng_state(), "sums": recipe.sums}
    digest = hashlib.sha256(json.dumps(optimizer["param_groups"], sort_keys=True, default=str).encode())
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    found = {"epoch": recipe.epoch, "batch": recipe.batch, "history": recipe.history, "best": recipe.best,
             "tensors": digest.hexdigest()}
    return json.loads(json.dumps(found))  # the floats as JSON gives them back, for comparing with the child's


def _child(data_dir: Path, workdir: Path, kill: dict[str, Any] | None) -> None:
    """Train, recording each checkpoint write's os calls and what it saved; SIGKILL where ``kill`` says.

    ``kill`` is None (run to the end) or {"write": w, "call": k, "torn": bool}: before the k-th call of the w-th
    write (k = the number of its calls: just after the write returns), or, torn, half way through that os.write.
    """
    writes: list[dict[str, Any]] = []
    calls: list[str] | None = None  # the calls of the write in progress, None outside one

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def counted(name: str, real: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            if calls is not None:
                if kill and (kill["write"], kill["call"]) == (len(writes), len(calls)):
                    if kill["torn"]:
                        real(args[0], args[1][: len(args[1]) // 2])
                    die()
                calls.append(name)
            return real(*args, **kwargs)

        return call

    for name in CALLS:
        setattr(os, name, counted(name, getattr(os, name)))
    save = Recipe._save_checkpoint

    def save_and_record(recipe: Recipe) -> None:
        nonlocal calls
        calls = []
        save(recipe)
        made, calls = calls, None
        if kill and (kill["write"], kill["call"]) == (len(writes), len(made)):
            die()
        writes.append({"calls": made, "saved": _fingerprint(recipe)})

    Recipe._save_checkpoint = save_and_record  # type: ignore[method-assign]
    train(load_config(None, _overrides(workdir)), data_dir=data_dir, progress=False)
    (workdir / "record.json").write_text(json.dumps(writes), encoding="utf-8")


def _fork_children(data_dir: Path, runs: list[dict[str, Any]]) -> None:
    """Run ``_child`` for each {"workdir", "kill"} in a process of its own, one after another; print the exit codes."""
    codes = []
    for run in runs:
        pid = os.fork()
        if pid == 0:  # the child: never returns into this loop
            try:
                _child(data_dir, Path(run["workdir"]), run["kill"])
                code = 0
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stderr.flush()
            os._exit(code)
        codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    print(json.dumps(codes))


def _run_children(data_dir: Path, runs: list[dict[str, Any]]) -> list[int]:
    """Each run's exit code: 0 when it trained to the end, -SIGKILL when it was killed."""
    for run in runs:
        Path(run["workdir"]).mkdir()  # as in every run: the write makes the same calls only if the same folders exist
    args = [sys.executable, __file__, str(data_dir), json.dumps(runs)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    codes = json.loads(done.stdout.splitlines()[-1])
    assert 1 not in codes, done.stderr[-3000:]
    return codes


@pytest.fixture(scope="module")
def data_dir(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("prepared")
    return prepare(load_config(None, ["data.source=local", f"data.root={synthetic_root}", f"workdir={work}"]),
                   progress=False).path


@pytest.fixture(scope="module")
def uninterrupted(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The reference run, in a child like the killed ones: its checkpoint writes (calls, state saved) and model."""
    work = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert _run_children(data_dir, [{"workdir": str(work), "kill": None}]) == [0]
    writes = json.loads((work / "record.json").read_text())
    assert len(writes) == 3, "one checkpoint per epoch"
    for write in writes:
        # The commit of a checkpoint is a rename; without one no write can be atomic, and this test would miss it.
        assert {"replace", "rename"} & set(write["calls"]), write["calls"]
    (folder,) = (work / "train").glob("t-*")
    return {"writes": writes, "model": load_file(str(folder / "model.safetensors")),
            "history": json.loads((folder / "history.json").read_text())}


def _kill_points(calls: list[str]) -> list[tuple[int, bool]]:
    """Before each call, half way through each os.write, and after the last call."""
    points = [(k, torn) for k, name in enumerate(calls) for torn in ((False, True) if name == "write" else (False,))]
    return [*points, (len(calls), False)]


def _on_disk(config: SignpostConfig, data_dir: Path) -> dict[str, Any] | None:
    """The fingerprint of what --resume would continue from; None when there is no checkpoint."""
    recipe = Recipe(config, data_dir, progress=False)
    try:
        recipe.setup(resume=True)
    except FileNotFoundError:
        return None
    finally:
        recipe.cleanup()
    return _fingerprint(recipe)


def _differences(found: dict[str, Any] | None, writes: list[dict[str, Any]]) -> list[list[str]]:
    """For each checkpoint the run wrote, the parts that differ from ``found``."""
    return [[k for k in write["saved"] if found is None or found[k] != write["saved"][k]] for write in writes]


@pytest.mark.slow
@pytest.mark.parametrize("write", [0, 1], ids=["first-write", "replacing-write"])
def test_a_kill_anywhere_in_a_checkpoint_write_resumes_exactly(
    write: int, data_dir: Path, uninterrupted: dict[str, Any], tmp_path: Path
) -> None:
    writes = uninterrupted["writes"]
    before = writes[write - 1]["saved"] if write > 0 else None
    calls = writes[write]["calls"]
    points = _kill_points(calls)
    runs = [{"workdir": str(tmp_path / f"call{call}{'-torn' if torn else ''}"),
             "kill": {"write": write, "call": call, "torn": torn}} for call, torn in points]
    codes = _run_children(data_dir, runs)
    for (call, torn), run, code in zip(points, runs, codes, strict=True):
        work = Path(run["workdir"])
        where = "after the write returned" if call == len(calls) else f"{'in' if torn else 'before'} call {call}"
        point = f"write {write} {calls}, killed {where}"
        assert code == -signal.SIGKILL, f"{point}: not killed (exit code {code})"

        config = load_config(None, _overrides(work))
        found = _on_disk(config, data_dir)
        differences = _differences(found, writes)  # per checkpoint written: the parts that differ from this one
        assert found in (before, writes[write]["saved"]), f"{point}: a mix of checkpoints, differences {differences}"
        if call == len(calls):
            assert found == writes[write]["saved"], f"{point}: a write that returned is not on disk"

        resumed = train(config, data_dir=data_dir, resume=found is not None, progress=False)
        model = load_file(str(resumed.path / "model.safetensors"))
        assert model.keys() == uninterrupted["model"].keys()
        assert all(torch.equal(model[k], uninterrupted["model"][k]) for k in model), f"{point}: other weights"
        assert json.loads((resumed.path / "history.json").read_text()) == uninterrupted["history"], point


# --- refusals ------------------------------------------------------------------------------------------------------


@pytest.fixture
def checkpointed(data_dir: Path, tmp_path: Path) -> Path:
    """A workdir whose run stopped after its first epoch's checkpoint; returns the checkpoint file."""
    recipe = Recipe(load_config(None, _overrides(tmp_path)), data_dir, progress=False)
    try:
        recipe.setup(resume=False)
        recipe.train_epoch()
        recipe.end_epoch()
    finally:
        recipe.cleanup()
    return recipe.checkpoint_dir / CHECKPOINT


def _resume(data_dir: Path, workdir: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["train", "--no-progress", "--resume", "--data", str(data_dir), *_overrides(workdir)])
    return code, capsys.readouterr().err


def _truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0x01])


def _flip_header_byte(data: bytes) -> bytes:
    header_end = 8 + int.from_bytes(data[:8], "little")
    at = data.index(b"epoch", 0, header_end) + 1  # inside the JSON state: the header's state is hashed too
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


@pytest.mark.parametrize("damage", [_truncate, _flip_last_byte, _flip_header_byte, lambda data: b""],
                         ids=["truncated", "data-byte-flipped", "state-byte-flipped", "empty"])
def test_a_damaged_checkpoint_is_refused_and_kept(
    damage: Any, data_dir: Path, checkpointed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    damaged = damage(checkpointed.read_bytes())
    checkpointed.write_bytes(damaged)
    code, err = _resume(data_dir, tmp_path, capsys)
    assert code == 1, err
    assert "is damaged" in err and "run without --resume to start over" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert checkpointed.read_bytes() == damaged  # refused, not replaced: the user decides


def test_an_old_two_file_checkpoint_is_refused(
    data_dir: Path, checkpointed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The layout before issue 13: the tensors alone in checkpoint.safetensors, the state beside it in JSON.
    save_file(load_file(str(checkpointed)), str(checkpointed))
    (checkpointed.parent / "checkpoint.json").write_text(json.dumps({"epoch": 1, "batch": 0}), encoding="utf-8")
    code, err = _resume(data_dir, tmp_path, capsys)
    assert code == 1, err
    assert "older Signpost" in err and "run without --resume to start over" in err and "Traceback" not in err


def test_an_intact_checkpoint_resumes(data_dir: Path, checkpointed: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _resume(data_dir, tmp_path, capsys)
    assert code == 0, err
    assert not checkpointed.parent.exists()  # the finished run removes its checkpoint folder


if __name__ == "__main__":
    _fork_children(Path(sys.argv[1]), json.loads(sys.argv[2]))
