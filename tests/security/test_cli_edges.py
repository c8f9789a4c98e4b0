"""The CLI as a careless user meets it: a wrong file, folder or URL gets one line naming the problem and the fix, a
non-zero exit and no traceback, and nothing is written or lost; ``key=value`` overrides work wherever they stand."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest

from signpost.cli import main
from signpost.stages.feedback import read_items

# A tiny synthetic dataset: were a refused command to run anyway, it would fail the test quickly.
TINY = ["data.synthetic.num_classes=2", "data.synthetic.min_tracks=1", "data.synthetic.max_tracks=1",
        "data.synthetic.frames_per_track=1", "data.synthetic.test_tracks=1", "data.synthetic.max_size=40"]
PNG = b"\x89PNG\r\n\x1a\n" + bytes(64)


def _one_line_error(capsys: pytest.CaptureFixture, *words: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` and its content hash: equal snapshots mean nothing was written or lost."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


# a. monitor --log on something that is not a prediction log


@pytest.mark.parametrize(("name", "content"), [("notes.txt", b"hello\n"), ("sign.png", PNG), ("empty.db", b"")])
@pytest.mark.parametrize("as_url", [True, False])
def test_monitor_refuses_a_file_that_is_not_a_database(
    tmp_path: Path, capsys: pytest.CaptureFixture, name: str, content: bytes, as_url: bool
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    log = f"sqlite:///{path}" if as_url else str(path)
    assert main(["monitor", "--log", log, f"workdir={tmp_path / 'work'}"]) == 1
    _one_line_error(capsys, f"{path} is not a prediction log database (not a SQLite file)", "sqlite:///")
    assert path.read_bytes() == content and not (tmp_path / "work").exists()


def test_monitor_refuses_another_sqlite_database_without_adding_tables(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "mlflow.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE runs (id INTEGER)")
    before = path.read_bytes()
    assert main(["monitor", "--log", f"sqlite:///{path}", f"workdir={tmp_path / 'work'}"]) == 1
    _one_line_error(capsys, f"{path} is not a prediction log database", "no predictions table", "runs")
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db"]


def test_monitor_refuses_a_missing_log_or_a_folder_and_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    missing = tmp_path / "typo" / "predictions.db"
    assert main(["monitor", "--log", f"sqlite:///{missing}", f"workdir={tmp_path / 'work'}"]) == 1
    _one_line_error(capsys, f"{missing} does not exist", "sqlite:///")
    assert not (tmp_path / "typo").exists()
    assert main(["monitor", "--log", f"sqlite:///{tmp_path}", f"workdir={tmp_path / 'work'}"]) == 1
    _one_line_error(capsys, f"{tmp_path} is a folder")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("log", "words"), [
    ("predictions.db", ["'predictions.db' is not a SQLAlchemy URL", "sqlite:///"]),
    ("nosuchdialect://host/db", ["no database driver for 'nosuchdialect'"]),
    ("postgresql+nosuchdriver://user:secret@127.0.0.1/db", ["no database driver", "user:***@"]),
])
def test_monitor_refuses_a_url_that_is_not_a_sqlalchemy_url(
    tmp_path: Path, capsys: pytest.CaptureFixture, log: str, words: list[str]
) -> None:
    assert main(["monitor", "--log", log, f"workdir={tmp_path / 'work'}"]) == 1
    line = _one_line_error(capsys, *words)
    assert "secret" not in line and not (tmp_path / "work").exists()


# b. prepare --data-root with a synthetic data.source


@pytest.mark.parametrize("root_arg", ["--data-root", "data.root="])
def test_prepare_refuses_a_data_root_that_a_synthetic_source_would_ignore(
    tmp_path: Path, capsys: pytest.CaptureFixture, root_arg: str
) -> None:
    raw = tmp_path / "my-gtsrb"
    raw.mkdir()
    root = ["--data-root", str(raw)] if root_arg == "--data-root" else [f"data.root={raw}"]
    args = ["prepare", "--no-progress", *root, "data.source=synthetic", f"workdir={tmp_path / 'work'}", *TINY]
    assert main(args) == 2
    _one_line_error(capsys, str(raw), "is ignored because data.source is synthetic", "data.source=local")
    assert not (tmp_path / "work").exists()  # no synthetic data was generated, nothing was prepared


def test_prepare_reads_the_data_root_once_the_source_is_local(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    raw = tmp_path / "my-gtsrb"
    raw.mkdir()
    args = ["prepare", "--no-progress", "data.source=synthetic", "--data-root", str(raw), "data.source=local",
            f"workdir={tmp_path / 'work'}"]
    assert main(args) == 1
    _one_line_error(capsys, "dataset folder is empty", str(raw))  # the folder was read, not ignored


# c. synth --out into a folder that is not empty


def test_synth_refuses_a_non_empty_folder_and_leaves_it_as_it_was(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "system"
    (out / "GTSRB").mkdir(parents=True)
    (out / "passwd").write_text("root:x:0:0\n")
    (out / "GTSRB" / "notes.txt").write_text("mine\n")
    before = _snapshot(out)
    assert main(["synth", "--no-progress", "--out", str(out), *TINY]) == 1
    _one_line_error(capsys, f"{out} is not empty", "Choose a new or empty folder")
    assert _snapshot(out) == before


def test_synth_refuses_a_file_and_writes_into_an_empty_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    file = tmp_path / "data.txt"
    file.write_text("keep\n")
    assert main(["synth", "--no-progress", "--out", str(file), *TINY]) == 1
    _one_line_error(capsys, f"{file} is a file, not a folder")
    assert file.read_text() == "keep\n"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["synth", "--no-progress", "--out", str(empty), *TINY]) == 0
    assert (empty / "GT-final_test.csv").is_file()


# d. key=value overrides after an option

STAGES = {"prepare": [], "train": [], "evaluate": [], "optimize": [], "bench": [], "serve": ["--model", "m"],
          "package": [], "monitor": [], "simulate": [], "feedback add": [], "promote": [], "rollback": [],
          "synth": ["--out", "o"], "run": []}


@pytest.mark.parametrize("command", list(STAGES))
def test_overrides_after_an_option_reach_the_config(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # The override after the options has a typo: the config's did-you-mean proves it was read as an override.
    args = [*command.split(), f"workdir={tmp_path / 'work'}", "--no-progress", *STAGES[command], "data.imge_size=32"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid config") and "image_size" in err and "Traceback" not in err
    assert not (tmp_path / "work").exists()


def test_overrides_before_between_and_after_options_all_apply(tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["synth", *TINY[:3], "--no-progress", *TINY[3:5], "--out", str(out), TINY[5], "data.synthetic.num_classes=3"]
    assert main(args) == 0
    classes = sorted(p.name for p in (out / "GTSRB" / "Final_Training" / "Images").iterdir())
    assert classes == ["00000", "00001", "00002"]  # the last override wins, as it would before the options
    assert len(list((out / "GTSRB" / "Final_Training" / "Images" / "00000").glob("*.ppm"))) == 1  # frames_per_track


def test_a_leftover_that_is_not_an_override_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["prepare", "seed=1", "--no-progress", "oops", f"workdir={tmp_path}"]) == 2
    assert capsys.readouterr().err.strip() == ("error: override 'oops': expected key=value, for example "
                                               "data.image_size=48")
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", "seed=1", "--bogus", "seed=2"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --bogus" in err and "seed=2" not in err and "Traceback" not in err


# e. feedback add --csv with a wrong header


@pytest.mark.parametrize(("text", "words"), [
    ("image,class\na.png,1\n", ["the header row must name the columns path,label; found 'image,class'"]),
    ("a.png,1\nb.png,2\n", ["the header row must name the columns path,label; found 'a.png,1'"]),
    ("label,file\n1,a.png\n", ["path,label; found 'label,file'"]),
    ("", ["is empty", "header row path,label"]),
    ("\n\n", ["is empty"]),
    ("path,label\n", ["has a header but no rows"]),
    ("path,label\na.png\n", ["line 2: expected a path and a label"]),
    ("path,label\n,3\n", ["line 2: expected a path and a label"]),
])
def test_feedback_csv_needs_the_path_label_header(
    tmp_path: Path, capsys: pytest.CaptureFixture, text: str, words: list[str]
) -> None:
    csv_file = tmp_path / "labels.csv"
    csv_file.write_text(text)
    assert main(["feedback", "add", "--csv", str(csv_file), f"workdir={tmp_path / 'work'}"]) == 1
    _one_line_error(capsys, str(csv_file), *words)
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize(("kind", "words"), [
    ("missing", ["does not exist", "path,label header"]),
    ("folder", ["is a folder", "path,label header"]),
    ("png", ["is not a readable text CSV", "UTF-8 CSV with a path,label header"]),
])
def test_feedback_csv_that_is_no_csv_file(
    tmp_path: Path, capsys: pytest.CaptureFixture, kind: str, words: list[str]
) -> None:
    given = tmp_path / "given"
    if kind == "folder":
        given.mkdir()
    elif kind == "png":
        given.write_bytes(PNG)
    assert main(["feedback", "add", "--csv", str(given), f"workdir={tmp_path / 'work'}"]) == 1
    _one_line_error(capsys, str(given), *words)
    assert not (tmp_path / "work").exists()


def test_feedback_csv_columns_are_found_by_name(tmp_path: Path) -> None:
    csv_file = tmp_path / "in" / "labels.csv"
    csv_file.parent.mkdir()
    # A spreadsheet's export: byte-order mark, capitalised names, columns in another order, an extra column.
    csv_file.write_text("\ufeffNote,Label,Path\nblurry,Stop,a.png\n\n,3,/abs/b.png\n", encoding="utf-8")
    assert read_items(csv_file) == [(csv_file.parent / "a.png", "Stop"), (Path("/abs/b.png"), "3")]
