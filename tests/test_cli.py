"""The CLI as a user meets it: --help everywhere, clear one-line errors, the stage's report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from signpost.cli import main

COMMANDS = ["prepare", "train", "evaluate", "optimize", "bench", "serve", "package", "monitor", "simulate",
            "feedback add", "promote", "rollback", "synth", "run"]


def _signpost(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "signpost.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_help(command: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*command.split(), "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--config" in out and "KEY=VALUE" in out


def test_no_command_prints_help(capsys: pytest.CaptureFixture) -> None:
    assert main([]) == 2
    assert "prepare" in capsys.readouterr().out


def test_bad_config_key_exits_2_without_traceback(capsys: pytest.CaptureFixture) -> None:
    assert main(["prepare", "data.imge_size=32"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid config") and "image_size" in err and "Traceback" not in err


def test_missing_dataset_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["prepare", "--no-progress", "--data-root", str(tmp_path / "none"), f"workdir={tmp_path}"])
    assert code == 1
    assert "does not exist" in capsys.readouterr().err


def test_prepare_then_reuse_through_the_console(synthetic_root: Path, tmp_path: Path) -> None:
    args = ["prepare", "--no-progress", "--data-root", str(synthetic_root), f"workdir={tmp_path}", "name=cli"]
    first = _signpost(*args)
    assert first.returncode == 0, first.stderr
    assert "prepare: wrote" in first.stdout and "gtsrb layout, 6 classes" in first.stdout
    second = _signpost(*args)
    assert second.returncode == 0, second.stderr
    assert "prepare: reused" in second.stdout and "inputs unchanged" in second.stdout


def test_synth_writes_the_official_layout(tmp_path: Path) -> None:
    out = tmp_path / "synthetic"
    result = _signpost(
        "synth", "--no-progress", "--out", str(out), "data.synthetic.num_classes=3",
        "data.synthetic.max_tracks=2", "data.synthetic.frames_per_track=3",
    )
    assert result.returncode == 0, result.stderr
    assert (out / "GTSRB" / "Final_Training" / "Images" / "00002" / "GT-00002.csv").is_file()
    assert (out / "GT-final_test.csv").is_file()


def test_entry_restarts_once_with_the_allocator_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    import signpost.cli as cli

    calls = []
    monkeypatch.setattr(cli.os, "execve", lambda path, args, env: calls.append((path, args, env)))
    monkeypatch.setattr(cli.sys, "argv", ["signpost", "prepare", "--help"])
    monkeypatch.setattr(cli.sys, "platform", "linux")
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("SIGNPOST_NO_REEXEC", raising=False)
    with pytest.raises(SystemExit):  # execve is stubbed, so entry() carries on into main(), which prints help
        cli.entry()
    ((path, args, env),) = calls
    assert path == sys.executable and args[1:] == ["-m", "signpost.cli", "prepare", "--help"]
    assert env["GLIBC_TUNABLES"] == cli.GLIBC_TUNABLES

    calls.clear()
    monkeypatch.setenv("GLIBC_TUNABLES", cli.GLIBC_TUNABLES)  # the restarted process: no second restart
    with pytest.raises(SystemExit):
        cli.entry()
    assert calls == []


@pytest.mark.parametrize(("action", "options"), [
    ("summary", ["--bench"]), ("pr-comment", ["--evaluation", "--bench", "--baseline", "--run-url"])])
def test_report_actions_have_help(action: str, options: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["report", action, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(option in out for option in options)


def test_report_needs_its_inputs_and_names_a_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["report", "pr-comment"])
    assert exit_info.value.code == 2 and "--evaluation" in capsys.readouterr().err
    assert main(["report", "pr-comment", "--evaluation", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --evaluation ") and "not a folder; give the folder `signpost evaluate` wrote" in err
    assert main(["report", "summary", "--bench", str(tmp_path)]) == 1  # a folder, but no bench's
    assert "no manifest.json" in capsys.readouterr().err
