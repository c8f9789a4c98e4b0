"""The prediction log's store: its tables, opening it (URL checks, SQLite in WAL mode, the schema brought to
this code's revision by the Alembic migrations in ``migrations/``), and the queries the monitor reads it by. The
server writes to it through ``signpost.serve.predlog_writer``. It is a SQLite file by default, or any SQLAlchemy
URL: ``postgresql://`` (psycopg 3) is the shared log of a deployment.

One row per image; the image statistics and the embedding summary are plain float columns, so a monitor can read
a million rows into numpy arrays without parsing anything.

Every row names the experiment whose server made it (the config's ``name``) and the model's lineage (the data it was
trained on, the model artifact's key), so several experiments can share one database, as a deployment's PostgreSQL
is shared: readers pass ``experiment=`` and see only that experiment's rows. Rows of a log made before rows named
their experiment read as ``UNKNOWN_EXPERIMENT``, which is no experiment's name.

Every row also names the device that made it: devices in the field classify locally and ship their records to the
server's ingest route (``signpost.serve.ingest``), which stores them with the device's id; the server's own rows
have ``SERVER_DEVICE`` (""). Readers pass ``device_id=`` for one device's rows; ``devices`` counts them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import (
    Column,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    func,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, DatabaseError

from signpost.data.stats import EMBEDDING_DIMS, STAT_NAMES

if TYPE_CHECKING:
    from alembic.script import ScriptDirectory

log = logging.getLogger(__name__)

EMBEDDING_COLUMNS = tuple(f"emb{i}" for i in range(EMBEDDING_DIMS))
# The experiment of the rows an older Signpost wrote, before rows named one: no config name can be this
# (config.NAME_PATTERN), so no monitor takes them for its own.
UNKNOWN_EXPERIMENT = "(unknown)"
# The device_id of the server's own predictions; a device's records name the device (POST /v1/predictions/ingest).
SERVER_DEVICE = ""

metadata = MetaData()
predictions = Table(
    "predictions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("ts", Float, nullable=False, index=True, doc="Unix time of the answer, seconds"),
    Column("request_id", String(36), nullable=False),
    Column("model_version", String(200), nullable=False),
    Column("experiment", String(200), nullable=False, default=UNKNOWN_EXPERIMENT, server_default=UNKNOWN_EXPERIMENT,
           index=True, doc="the config name of the server that made it; readers keep their own experiment's rows"),
    Column("data_key", String(100), nullable=False, default="", server_default="",
           doc="the model card's data_key: the prepared data the model was trained on; '' when not known"),
    Column("model_key", String(100), nullable=False, default="", server_default="",
           doc="the model artifact's manifest key; '' when not known"),
    Column("device_id", String(100), nullable=False, default=SERVER_DEVICE, server_default=SERVER_DEVICE,
           index=True, doc="the device that made it and shipped it to the ingest route; '' the server itself"),
    Column("class_id", Integer, nullable=False),
    Column("class_name", String(200), nullable=False),
    Column("confidence", Float, nullable=False),
    Column("entropy", Float, nullable=False, doc="of the class distribution, nats"),
    Column("top_k", Text, nullable=False, doc="JSON [[class_id, probability], ...]"),
    Column("latency_ms", Float, nullable=False, doc="server-side, from body received to answer"),
    Column("width", Integer, nullable=False, doc="of the uploaded image, pixels"),
    Column("height", Integer, nullable=False),
    Column("orientation", Integer, nullable=False, default=1, server_default="1",
           doc="the EXIF orientation the image was turned upright by: 1 none (or no EXIF), 2-8 mirrored or rotated"),
    *(Column(name, Float, nullable=False) for name in STAT_NAMES),
    *(Column(name, Float, nullable=False) for name in EMBEDDING_COLUMNS),
)


# One row per batch a device shipped, inserted in the transaction that stores its predictions: a retried batch
# finds its row and is stored once (signpost.serve.ingest).
ingest_batches = Table(
    "ingest_batches",
    metadata,
    Column("device_id", String(100), primary_key=True),
    Column("batch_id", String(100), primary_key=True, doc="the device's own id for the batch"),
    Column("received_ts", Float, nullable=False, doc="Unix time the server stored it, seconds"),
    Column("records", Integer, nullable=False, doc="predictions stored with it"),
)


def default_url(workdir: Path) -> str:
    """The default store: ``workdir/serve/predictions.db``."""
    path = (Path(workdir) / "serve" / "predictions.db").resolve()
    return f"sqlite:///{path}"


request_errors = Table(
    "request_errors",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("ts", Float, nullable=False, index=True, doc="Unix time of the answer, seconds"),
    Column("route", String(100), nullable=False),
    Column("status", Integer, nullable=False),
    Column("code", String(100), nullable=False, doc="the error code the client was given"),
    Column("experiment", String(200), nullable=False, default=UNKNOWN_EXPERIMENT, server_default=UNKNOWN_EXPERIMENT,
           doc="the config name of the server that answered"),
)


def error_count(url: str, since: float, until: float, *, experiment: str | None = None) -> int:
    """Prediction requests answered with an error between Unix times ``since`` and ``until`` (by ``experiment``'s
    servers only, when given)."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            query = select(func.count()).select_from(request_errors).where(
                request_errors.c.ts >= since, request_errors.c.ts <= until)
            if experiment is not None:
                query = query.where(request_errors.c.experiment == experiment)
            return int(conn.execute(query).scalar_one())
    finally:
        engine.dispose()


def redact(url: str) -> str:
    """``url`` with any password hidden, for reports and logs."""
    return make_url(url).render_as_string(hide_password=True)


class PredictionLogError(ValueError):
    """A prediction log URL that cannot be used; the message names it and says what to give instead."""


_URL_HINT = ("give the file `signpost serve` writes as sqlite:////absolute/path/predictions.db, or a database URL "
             "such as postgresql+psycopg://user@host/db")


def _parse_url(url: str) -> URL:
    try:
        parsed = make_url(url)
    except ArgumentError:
        plain = Path(url).expanduser()
        hint = f"for that file give sqlite:///{plain.resolve()}" if plain.exists() else _URL_HINT
        raise PredictionLogError(f"{url!r} is not a SQLAlchemy URL: {hint}") from None
    if parsed.drivername == "postgresql":  # SQLAlchemy's default would be psycopg2; Signpost installs psycopg 3
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def _sqlite_file(parsed: URL) -> Path | None:
    """The file a SQLite URL names; None for other databases and in-memory SQLite."""
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def check_log(url: str) -> None:
    """Refuse (PredictionLogError) a ``url`` that names no existing prediction log, before anything opens it.

    For readers such as the monitor: opening creates the log's tables, so a mistyped path would become a new empty
    database, and another SQLite file (MLflow's, say) would get prediction tables added to it.
    """
    if "://" not in url and Path(url).is_file():
        _check_sqlite_file(Path(url))  # a plain path: first say whether the file is a prediction log at all
    path = _sqlite_file(_parse_url(url))
    if path is not None:  # a database server: make_engine says what is wrong with it
        _check_sqlite_file(path)


def _check_sqlite_file(path: Path) -> None:
    if not path.is_file():
        state = "is a folder" if path.is_dir() else "does not exist"
        raise PredictionLogError(f"{path} {state}: no prediction log database there; {_URL_HINT}")
    with open(path, "rb") as fh:
        if fh.read(16) != b"SQLite format 3\x00":  # the header every SQLite database file starts with
            raise PredictionLogError(f"{path} is not a prediction log database (not a SQLite file): {_URL_HINT}")
    try:  # read-only: checking must not write to the file either
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as conn:
            tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error as exc:
        raise PredictionLogError(f"{path} is not a prediction log database ({exc}): {_URL_HINT}") from None
    if tables and predictions.name not in tables:
        named = ", ".join(sorted(tables)[:3]) + (", ..." if len(tables) > 3 else "")
        raise PredictionLogError(f"{path} is not a prediction log database (no {predictions.name} table; it has "
                                 f"{named}): {_URL_HINT}")


def make_engine(url: str) -> Engine:
    """An engine for ``url`` whose schema is at this code's revision (``migrate``); SQLite files get WAL mode,
    and their folder is created.

    A URL that does not parse, names a missing driver, opens something that is not a database, or a log newer
    than this code raises PredictionLogError (one line: what is wrong and what to give instead).
    """
    parsed = _parse_url(url)
    path = _sqlite_file(parsed)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        engine = create_engine(parsed)
    except (ArgumentError, ImportError) as exc:  # an unknown dialect, or its driver package not installed
        raise PredictionLogError(f"cannot open the prediction log {redact(url)}: no database driver for "
                                 f"{parsed.drivername!r} ({exc}); {_URL_HINT}") from None
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer; a crash keeps commits
            cursor.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across a process crash
            cursor.execute("PRAGMA busy_timeout=5000")  # ms to wait for a monitor holding a lock
            cursor.close()

    try:
        migrate(engine)
    except PredictionLogError:
        engine.dispose()
        raise
    except DatabaseError as exc:  # SQLite: "file is not a database", "unable to open"; a server: refused, no login
        engine.dispose()
        reason = " ".join(str(exc.orig or exc).split())  # a server's message can span lines
        where = f"{path} is not a prediction log database" if path else f"cannot open the prediction log {redact(url)}"
        raise PredictionLogError(f"{where} ({reason}): {_URL_HINT}") from None
    return engine


MIGRATIONS = Path(__file__).with_name("migrations")
# The table Alembic keeps the log's revision in; not alembic_version, which MLflow's store in the same database
# (a team may point both at one PostgreSQL database) keeps its own revision in.
VERSION_TABLE = "prediction_log_version"
_ADOPTED = "0001"  # the revision a log made before migrations is stamped at; 0002 adds what it lacks
_LOCK_KEY = 0x5349474E504F5354  # PostgreSQL advisory lock ("SIGNPOST"): one upgrade at a time per database


def migrate(engine: Engine) -> None:
    """Bring the log's schema to this code's head revision through the Alembic migrations in ``migrations/``.

    An empty database gets the tables; a log made before migrations (a ``predictions`` table, no version table)
    is stamped at revision 0001 and upgraded, its rows kept; a log at head is left alone (one cheap read). Servers
    starting together upgrade one at a time: the upgrade holds a lock (an advisory lock on PostgreSQL, SQLite's
    write lock) and looks again once it has it. A log at a revision this code does not know (made by a newer
    Signpost) raises PredictionLogError before anything is written.
    """
    # alembic's first import logs its plugins' setup at INFO: seven lines on every command that opens a log.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    from alembic import command
    from alembic.config import Config

    script = _script()
    head = script.get_current_head()
    with engine.connect() as conn:
        if _revision(conn) == head:
            return
        conn.rollback()  # end the read's transaction: the lock below begins the upgrade's
        if engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})  # freed at commit
        elif engine.dialect.name == "sqlite":
            conn.exec_driver_sql("BEGIN IMMEDIATE")  # SQLite's write lock, waited for up to busy_timeout
        current = _revision(conn)
        if current is not None and current not in {rev.revision for rev in script.walk_revisions()}:
            raise PredictionLogError(
                f"the prediction log {engine.url.render_as_string(hide_password=True)} is at schema "
                f"revision {current!r}, which this Signpost does not know (its newest is {head!r}): a newer Signpost "
                "made it; upgrade Signpost to use it (nothing was written)")
        if current == head:
            return
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS).replace("%", "%%"))
        config.set_main_option("version_table", VERSION_TABLE)
        config.attributes["connection"] = conn
        if current is None and inspect(conn).has_table(predictions.name):
            log.info("the prediction log was made before schema migrations: stamping it at revision %s", _ADOPTED)
            command.stamp(config, _ADOPTED)
        command.upgrade(config, "head")
        conn.commit()
        log.info("prediction log schema upgraded from %s to %s", current or "nothing", head)


@functools.cache
def _script() -> ScriptDirectory:
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(MIGRATIONS))


def _revision(conn: Connection) -> str | None:
    """The log's schema revision; None when it has no version table (empty, or made before migrations). Read
    directly, not through alembic's MigrationContext, which logs its setup at INFO on every open."""
    if not inspect(conn).has_table(VERSION_TABLE):
        return None
    return conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()


def count(url: str, *, experiment: str | None = None) -> int:
    """Number of records in the log at ``url`` (``experiment``'s only, when given)."""
    engine = make_engine(url)
    try:
        query = select(func.count()).select_from(predictions)
        if experiment is not None:
            query = query.where(predictions.c.experiment == experiment)
        with engine.connect() as conn:
            return int(conn.execute(query).scalar_one())
    finally:
        engine.dispose()


def read_window(
    url: str,
    columns: list[str],
    *,
    last: int | None = None,
    since: float | None = None,
    chunk: int = 100_000,
    model_version: str | None = None,
    experiment: str | None = None,
    device_id: str | None = None,
) -> Iterator[np.ndarray]:
    """The newest ``last`` records (or those since Unix time ``since``), numeric ``columns`` only, as float64
    arrays ``[rows, len(columns)]`` of at most ``chunk`` rows, oldest first: a caller that folds each chunk into
    running totals reads any window in bounded memory. ``model_version`` keeps that model's records of the window.
    ``experiment``: that experiment's records only, and ``last`` counts only those. ``device_id`` keeps that
    device's records of the window (``SERVER_DEVICE``: the server's own).

    The rows come through the driver's own cursor: SQLAlchemy's row objects cost ~3x the time on a million rows.
    On PostgreSQL (psycopg), through a binary COPY read by numpy: the cursor's Python floats took 12 s of a 1M-row
    window's read, COPY 3 s (BENCHMARKS.md).
    """
    unknown = [name for name in columns if name not in predictions.c]
    if unknown:
        raise ValueError(f"the prediction log has no column {unknown}")
    engine = make_engine(url)
    try:
        where = _window_where(engine, last, since, experiment)
        if where is None:
            return
        if model_version is not None:
            where += f" AND model_version = {_quoted(model_version)}"
        if device_id is not None:
            where += f" AND device_id = {_quoted(device_id)}"
        raw = engine.raw_connection()
        try:
            if engine.dialect.driver == "psycopg":  # PostgreSQL: binary COPY, ~4x the rows per second of a cursor
                doubles = ", ".join(f"{name}::float8" for name in columns)
                yield from _copy_doubles(raw, f"SELECT {doubles} FROM predictions WHERE {where} ORDER BY id",
                                         len(columns), chunk)
                return
            cursor = raw.cursor()
            cursor.execute(f"SELECT {', '.join(columns)} FROM predictions WHERE {where} ORDER BY id")
            while rows := cursor.fetchmany(chunk):
                yield np.array(rows, dtype=np.float64)
            cursor.close()
        finally:
            raw.close()
    finally:
        engine.dispose()


_COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"  # the first 11 bytes of PostgreSQL's binary COPY output
_COPY_END = b"\xff\xff"  # the trailer: a field count of -1


def _copy_doubles(raw: Any, query: str, width: int, chunk: int) -> Iterator[np.ndarray]:
    """The rows of ``query`` (``width`` float8 columns, none NULL) through ``COPY ... TO STDOUT (FORMAT BINARY)``,
    as float64 arrays of at most ``chunk`` rows.

    Each row of that format is a 2-byte field count, then per field a 4-byte length and the 8-byte big-endian
    value: with every field a double, the rows are fixed-size records, and numpy reads a block of them as one
    strided view instead of building a Python float per value (what a cursor does).
    """
    row_bytes = 2 + 12 * width
    buffer = bytearray()
    start = -1  # where the first row begins, once the header has arrived
    with raw.cursor() as cursor, cursor.copy(f"COPY ({query}) TO STDOUT (FORMAT BINARY)") as copy:
        for block in copy:
            buffer += block
            if start < 0:
                if len(buffer) < 19 or len(buffer) < 19 + int.from_bytes(buffer[15:19], "big"):
                    continue
                if bytes(buffer[:11]) != _COPY_SIGNATURE:
                    raise ValueError("PostgreSQL's COPY output does not start with its binary signature")
                start = 19 + int.from_bytes(buffer[15:19], "big")  # signature, flags, header extension length
            while len(buffer) - start >= chunk * row_bytes:
                yield _doubles(buffer, start, chunk, width)
                del buffer[: start + chunk * row_bytes]
                start = 0
    rows, rest = divmod(len(buffer) - max(start, 0) - len(_COPY_END), row_bytes)
    if start < 0 or rest or bytes(buffer[-2:]) != _COPY_END:
        raise ValueError(f"PostgreSQL's COPY output ended mid-row ({len(buffer)} bytes left)")
    if rows:
        yield _doubles(buffer, start, rows, width)


def _doubles(buffer: bytearray, start: int, rows: int, width: int) -> np.ndarray:
    """``rows`` binary COPY rows of ``width`` doubles from ``buffer[start:]``, as a native float64 copy."""
    row_bytes = 2 + 12 * width
    counts = np.ndarray((rows,), ">i2", buffer, start, (row_bytes,))
    lengths = np.ndarray((rows, width), ">i4", buffer, start + 2, (row_bytes, 12))
    if (counts != width).any() or (lengths != 8).any():  # -1: a NULL, which the log's columns never hold
        raise ValueError("PostgreSQL's COPY rows are not all non-NULL doubles")
    return np.ndarray((rows, width), ">f8", buffer, start + 6, (row_bytes, 12)).astype(np.float64)


def model_versions(url: str, *, last: int | None = None, since: float | None = None,
                   experiment: str | None = None) -> dict[str, int]:
    """The model versions in the window (as ``read_window`` chooses it) and their record counts."""
    return _counts(url, "model_version", last, since, experiment)


def devices(url: str, *, last: int | None = None, since: float | None = None,
            experiment: str | None = None) -> dict[str, int]:
    """The devices in the window (as ``read_window`` chooses it) and their record counts; ``SERVER_DEVICE`` ("")
    counts the server's own records."""
    return _counts(url, "device_id", last, since, experiment)


def experiments(url: str, *, last: int | None = None, since: float | None = None) -> dict[str, int]:
    """The experiments in the window of the whole log (its newest ``last`` records, or those since ``since``) and
    their record counts: what a reader of one experiment passed over (UNKNOWN_EXPERIMENT: rows of an older log)."""
    return _counts(url, "experiment", last, since, None)


def _counts(url: str, column: str, last: int | None, since: float | None, experiment: str | None) -> dict[str, int]:
    engine = make_engine(url)
    try:
        where = _window_where(engine, last, since, experiment)
        if where is None:
            return {}
        with engine.connect() as conn:
            rows = conn.execute(text(f"SELECT {column}, COUNT(*) FROM predictions WHERE {where} "
                                     f"GROUP BY {column}")).all()
        return {str(value): int(n) for value, n in rows}
    finally:
        engine.dispose()


def _window_where(engine: Engine, last: int | None, since: float | None, experiment: str | None) -> str | None:
    """A WHERE clause for the window (numbers and a quoted name, safe to format), or None when it is empty.
    With ``experiment``, the window is that experiment's newest ``last`` records: others in between do not count."""
    with engine.connect() as conn:
        ids = select(predictions.c.id)
        if experiment is not None:
            ids = ids.where(predictions.c.experiment == experiment)
        if since is not None:
            ids = ids.where(predictions.c.ts >= since)
        if last is not None:
            ids = ids.order_by(predictions.c.id.desc()).limit(last)
        first = conn.execute(select(func.min(ids.subquery().c.id))).scalar()
    if first is None:
        return None
    return (f"id >= {int(first)}" + (f" AND ts >= {float(since)!r}" if since is not None else "")
            + (f" AND experiment = {_quoted(experiment)}" if experiment is not None else ""))


def _quoted(value: str) -> str:
    """``value`` as an SQL string literal. Experiment names follow config.NAME_PATTERN, so they hold no ':' that
    text() would take for a parameter, and device ids follow the same pattern (config.DEVICE_ID_PATTERN)."""
    return "'{}'".format(value.replace("'", "''"))
