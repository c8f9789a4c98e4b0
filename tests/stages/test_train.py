"""The train stage: a loadable artifact, reuse, exact resume after SIGKILL and SIGINT, and DDP under torchrun."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from signpost.artifacts import verify_artifact
from signpost.models.artifact import load_model
from signpost.stages.prepare import prepare
from signpost.stages.train import train
from signpost.training import CHECKPOINT
from signpost.training.checkpoint import read_checkpoint
from tests.conftest import local_config

# Small and deterministic: one thread, so a resumed run can match an uninterrupted one bit for bit.
TRAIN = ["train.batch_size=16", "train.epochs=3", "train.threads=1", "train.warmup_epochs=0.5"]


@pytest.fixture(scope="module")
def data_dir(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("prepared")
    return prepare(local_config(synthetic_root, work), progress=False).path


def _signpost(*args: str, **kwargs: object) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "signpost.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        **kwargs,
    )


def _train_args(data_dir: Path, workdir: Path, *extra: str) -> list[str]:
    return ["train", "--no-progress", "--data", str(data_dir), f"workdir={workdir}", "name=t", *TRAIN, *extra]


def _history(workdir: Path) -> list[dict]:
    (folder,) = (workdir / "train").glob("t-*")
    return json.loads((folder / "history.json").read_text())


def _uninterrupted_history(data_dir: Path, workdir: Path) -> list[dict]:
    reference = _signpost(*_train_args(data_dir, workdir))
    _, err = reference.communicate(timeout=300)  # communicate, not wait: a full pipe would block the child
    assert reference.returncode == 0, err
    return _history(workdir)


def _wait_for_checkpoint(workdir: Path, proc: subprocess.Popen, epochs: int = 1, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for checkpoint in (workdir / "train" / ".checkpoints").glob(f"*/{CHECKPOINT}"):
            try:
                if read_checkpoint(checkpoint)[1]["epoch"] >= epochs:
                    return
            except (OSError, ValueError):
                pass  # written atomically, but the glob may race a rename
        if proc.poll() is not None:
            raise AssertionError(f"training ended before a checkpoint: {proc.communicate()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("no checkpoint within the time limit")


def test_train_writes_a_loadable_artifact_and_reuses_it(data_dir: Path, tmp_path: Path) -> None:
    config = local_config(tmp_path / "unused", tmp_path, *TRAIN, "train.epochs=2")
    epochs = []
    result = train(config, data_dir=data_dir, progress=False, on_epoch=lambda metrics, epoch: epochs.append(epoch))
    assert not result.reused and epochs == [1, 2]
    verify_artifact(result.path)
    model, card = load_model(result.path)
    assert card.architecture == "signnet" and card.num_classes == 6 and card.image_size == 32
    assert card.data_key == json.loads((data_dir / "manifest.json").read_text())["key"]
    assert len(json.loads((result.path / "history.json").read_text())) == 2
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 6)
    assert not any((tmp_path / "train" / ".checkpoints").glob("*/checkpoint.*"))  # cleaned up once finished

    assert train(config, data_dir=data_dir, progress=False).reused
    changed = local_config(tmp_path / "unused", tmp_path, *TRAIN, "train.epochs=2", "train.lr=0.001")
    assert train(changed, data_dir=data_dir, progress=False).path != result.path


def test_a_killed_run_resumes_and_ends_with_the_same_metrics(data_dir: Path, tmp_path: Path) -> None:
    reference = _uninterrupted_history(data_dir, tmp_path / "a")

    killed = _signpost(*_train_args(data_dir, tmp_path / "b"))
    _wait_for_checkpoint(tmp_path / "b", killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    resumed = _signpost(*_train_args(data_dir, tmp_path / "b"), "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "resuming at epoch" in err
    assert _history(tmp_path / "b") == reference


def test_sigint_saves_a_checkpoint_and_exits_cleanly(data_dir: Path, tmp_path: Path) -> None:
    reference = _uninterrupted_history(data_dir, tmp_path / "a")

    interrupted = _signpost(*_train_args(data_dir, tmp_path / "b"))
    _wait_for_checkpoint(tmp_path / "b", interrupted)
    interrupted.send_signal(signal.SIGINT)
    _, err = interrupted.communicate(timeout=60)
    assert interrupted.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    resumed = _signpost(*_train_args(data_dir, tmp_path / "b"), "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert _history(tmp_path / "b") == reference


def test_resume_without_a_checkpoint_is_a_clear_error(data_dir: Path, tmp_path: Path) -> None:
    proc = _signpost(*_train_args(data_dir, tmp_path), "--resume")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert "no checkpoint for this run" in err


def test_two_process_ddp_under_torchrun(data_dir: Path, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
         "--master-port", str(port), "-m", "signpost.cli", *_train_args(data_dir, tmp_path, "train.epochs=2")],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (folder,) = (tmp_path / "train").glob("t-*")  # rank 0 alone wrote one artifact
    manifest = verify_artifact(folder)
    assert manifest["config"]["world_size"] == 2
    assert len(manifest["history"]) == 2
    assert proc.stdout.count("train: wrote") == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_with_c10d_rendezvous_train_as_two_processes_do(data_dir: Path, tmp_path: Path) -> None:
    # Two "machines" on loopback: two torchrun agents of one worker each, meeting at a c10d rendezvous, each with a
    # workdir of its own (only the prepared data is shared, as the README asks of real machines).
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOGLEVEL": "INFO"}  # LOGLEVEL: the agents log their rendezvous
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
             "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"t{port}",
             "--local-addr", "127.0.0.1", "--max-restarts", "0",
             "-m", "signpost.cli", *_train_args(data_dir, tmp_path / f"node{i}", "train.epochs=1")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for i in range(2)
    ]
    try:
        outputs = [node.communicate(timeout=300) for node in nodes]  # communicate: a full pipe would block a node
    finally:
        for node in nodes:
            node.kill()
    for node, (_, err) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, err[-3000:]
    # Both agents joined one group of two, with a node rank each; which node got rank 0 is the rendezvous's choice.
    for _, err in outputs:
        assert "group_world_size=2" in err, err[-3000:]
    assert sorted(re.search(r"group_rank=(\d+)", err)[1] for _, err in outputs) == ["0", "1"]
    writers = [i for i, (out, _) in enumerate(outputs) if "train: wrote" in out]
    assert len(writers) == 1 and outputs[writers[0]][0].count("train: wrote") == 1
    assert not list((tmp_path / f"node{1 - writers[0]}").glob("train/t-*"))  # the other node wrote nothing
    (folder,) = (tmp_path / f"node{writers[0]}" / "train").glob("t-*")
    manifest = verify_artifact(folder)
    assert manifest["config"]["world_size"] == 2

    # The same training as two processes on one machine: the same weights, bit for bit.
    single = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
         "--master-port", str(_free_port()), "-m", "signpost.cli",
         *_train_args(data_dir, tmp_path / "single", "train.epochs=1")],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    (expected,) = (tmp_path / "single" / "train").glob("t-*")
    assert folder.name == expected.name  # the same inputs and settings: the same artifact key
    two_nodes, one_node = load_model(folder)[0].state_dict(), load_model(expected)[0].state_dict()
    assert two_nodes.keys() == one_node.keys()
    assert all(torch.equal(two_nodes[k], one_node[k]) for k in two_nodes)
    assert json.loads((folder / "history.json").read_text()) == json.loads((expected / "history.json").read_text())
