"""The prediction log's schema through its Alembic migrations, on SQLite: a new log, a log made before migrations
(older columns, or today's with no version table) upgraded with its rows kept, a log of a newer Signpost refused,
and processes opening a new log at once."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Column, MetaData, Table, create_engine, insert

from signpost.data.stats import STAT_NAMES
from signpost.serve import predlog

# What the first prediction logs lacked: the columns added later, the request_errors table, the indexes.
LATER = ("orientation", "experiment", "data_key", "model_key", "device_id")
ROW = {"ts": 1.0, "request_id": "old", "model_version": "v0", "class_id": 1, "class_name": "b", "confidence": 0.9,
       "entropy": 0.2, "top_k": "[]", "latency_ms": 3.0, "width": 32, "height": 32,
       **{name: 0.5 for name in (*STAT_NAMES, *predlog.EMBEDDING_COLUMNS)}}


def _head() -> str:
    return predlog._script().get_current_head()


def _revision(path: Path) -> str:
    with sqlite3.connect(path) as conn:
        return conn.execute(f"SELECT version_num FROM {predlog.VERSION_TABLE}").fetchone()[0]


def _schema_diff(url: str) -> list:
    """What the log's tables lack or have beyond ``predlog``'s models: tables, columns, types, indexes. (Not the
    defaults: SQLite reflects them quoted, so Alembic reports every one; the rows above check them.)"""
    engine = create_engine(url)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True,
                                                         "version_table": predlog.VERSION_TABLE})
        diff = compare_metadata(context, predlog.metadata)
    engine.dispose()
    return diff


def test_a_new_log_is_made_by_the_migrations(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'log.db'}"
    predlog.make_engine(url).dispose()
    assert _revision(tmp_path / "log.db") == _head()
    assert _schema_diff(url) == []


def test_the_first_kind_of_log_is_upgraded_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    first = MetaData()  # predictions without the later columns, no indexes, no request_errors
    table = Table("predictions", first, *(Column(c.name, c.type, primary_key=c.primary_key, nullable=c.nullable)
                                          for c in predlog.predictions.columns if c.name not in LATER))
    engine = create_engine(f"sqlite:///{path}")
    first.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(table), [{**ROW, "ts": float(i)} for i in range(30)])
    engine.dispose()

    predlog.make_engine(f"sqlite:///{path}").dispose()
    assert _revision(path) == _head()
    assert _schema_diff(f"sqlite:///{path}") == []
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT COUNT(*), MIN(id), MAX(id) FROM predictions").fetchone() == (30, 1, 30)
        assert conn.execute("SELECT DISTINCT experiment, orientation, data_key FROM predictions").fetchall() == [
            (predlog.UNKNOWN_EXPERIMENT, 1, "")]
    assert predlog.experiments(f"sqlite:///{path}") == {predlog.UNKNOWN_EXPERIMENT: 30}


def test_a_log_with_todays_tables_but_no_version_is_stamped_not_made_again(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    engine = create_engine(f"sqlite:///{path}")
    predlog.metadata.create_all(engine)  # as Signpost made logs before migrations
    with engine.begin() as conn:
        conn.execute(insert(predlog.predictions), [{**ROW, "experiment": "t"}] * 5)
    engine.dispose()

    assert predlog.count(f"sqlite:///{path}", experiment="t") == 5
    assert _revision(path) == _head()
    assert _schema_diff(f"sqlite:///{path}") == []


def test_a_log_of_a_newer_signpost_is_refused_and_nothing_written(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'log.db'}"
    predlog.make_engine(url).dispose()
    with sqlite3.connect(tmp_path / "log.db") as conn:
        conn.execute(f"UPDATE {predlog.VERSION_TABLE} SET version_num = 'f00d'")
        conn.execute("DROP INDEX ix_predictions_ts")  # would be made again by an upgrade
    with pytest.raises(predlog.PredictionLogError, match=r"revision 'f00d'.*upgrade Signpost.*nothing was written"):
        predlog.make_engine(url)
    with sqlite3.connect(tmp_path / "log.db") as conn:
        assert conn.execute(f"SELECT version_num FROM {predlog.VERSION_TABLE}").fetchall() == [("f00d",)]
        assert not conn.execute("SELECT name FROM sqlite_master WHERE name = 'ix_predictions_ts'").fetchall()


def test_processes_opening_a_new_log_at_once_upgrade_it_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'log.db'}"
    code = ("import sys; from signpost.serve import predlog; predlog.make_engine(sys.argv[1]).dispose(); "
            "print(predlog.count(sys.argv[1]))")
    runs = [subprocess.Popen([sys.executable, "-c", code, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(4)]
    outputs = [run.communicate(timeout=120) for run in runs]
    assert [run.returncode for run in runs] == [0] * 4, [err for _, err in outputs]
    assert [out.strip() for out, _ in outputs] == ["0"] * 4
    assert _revision(tmp_path / "log.db") == _head()


def _log_at(url: str, revision: str) -> None:
    """A log made by the migrations up to ``revision`` only, as an older Signpost made it."""
    from alembic import command
    from alembic.config import Config

    engine = create_engine(url)
    with engine.connect() as conn:
        config = Config()
        config.set_main_option("script_location", str(predlog.MIGRATIONS))
        config.set_main_option("version_table", predlog.VERSION_TABLE)
        config.attributes["connection"] = conn
        command.upgrade(config, revision)
        conn.commit()
    engine.dispose()


def test_a_log_before_devices_gains_them_and_keeps_its_rows_as_the_servers(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    url = f"sqlite:///{path}"
    _log_at(url, "0002")
    with sqlite3.connect(path) as conn:
        assert "device_id" not in {row[1] for row in conn.execute("PRAGMA table_info(predictions)")}
        names = ", ".join(ROW)
        conn.executemany(f"INSERT INTO predictions (experiment, {names}) VALUES (?, {', '.join('?' * len(ROW))})",
                         [("t", *{**ROW, "ts": float(i)}.values()) for i in range(12)])

    predlog.make_engine(url).dispose()
    assert _revision(path) == _head() == "0003"
    assert _schema_diff(url) == []
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT COUNT(*), MIN(id), MAX(id) FROM predictions").fetchone() == (12, 1, 12)
        assert conn.execute("SELECT COUNT(*) FROM ingest_batches").fetchone() == (0,)
    assert predlog.devices(url, experiment="t") == {predlog.SERVER_DEVICE: 12}
    rows = list(predlog.read_window(url, ["ts"], experiment="t", device_id=predlog.SERVER_DEVICE))
    assert sum(len(chunk) for chunk in rows) == 12
    assert list(predlog.read_window(url, ["ts"], experiment="t", device_id="cam-1")) == []
