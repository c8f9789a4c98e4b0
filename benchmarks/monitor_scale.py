"""How long `signpost monitor` takes over a large prediction log (the goal: 1,000,000 predictions in <= 15 s on
2 cores, on SQLite and on PostgreSQL).

Writes N synthetic prediction records into a fresh log (not timed): a SQLite file in WAL mode, as the server makes
it, or the empty PostgreSQL database ``--log`` names (filled with COPY). Their image statistics and classes are
resampled from the monitor's own reference so that the verdict is "no drift". Then it times the monitor over the
whole window (reading, folding, the drift tests, the report) and its peak memory.

    python benchmarks/monitor_scale.py                       # 1,000,000 rows, the newest prepared demo data
    python benchmarks/monitor_scale.py --rows 200000 --data artifacts/data/demo-...
    python benchmarks/monitor_scale.py --log postgresql://user@127.0.0.1:5432/empty_db
"""

from __future__ import annotations

import argparse
import glob
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from signpost.config import load_config
from signpost.data.stats import STAT_NAMES
from signpost.serve import predlog
from signpost.stages.monitor import load_reference, monitor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--data", help="prepared data folder for the reference (default: the newest under artifacts/)")
    parser.add_argument("--model", help="model folder for the embedding reference (default: none)")
    parser.add_argument("--log", help="an empty database to fill, as a SQLAlchemy URL (default: a new SQLite file)")
    args = parser.parse_args()
    data = args.data or max(glob.glob("artifacts/data/*/"), key=os.path.getmtime, default=None)
    if data is None:
        sys.exit("no prepared data: run `make demo` first, or pass --data")

    work = Path(tempfile.mkdtemp(prefix="monitor-scale-"))
    url = args.log or predlog.default_url(work)
    if predlog.count(url):
        sys.exit(f"{predlog.redact(url)} already holds prediction records: give an empty database")
    started = time.perf_counter()
    _fill(url, Path(data), args.rows, work / "monitor")
    print(f"wrote {args.rows:,} records to {predlog.redact(url)} in {time.perf_counter() - started:.1f} s "
          "(not timed below)")

    config = load_config(None, [f"workdir={work}", "tracking.backend=none", "name=scale"])
    started = time.perf_counter()
    result = monitor(config, data_dir=Path(data), log_url=url, last=args.rows, alerts=False,
                     model_dir=Path(args.model) if args.model else None)
    seconds = time.perf_counter() - started
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    verdict = result.result["verdict"]
    rows = result.result["window"]["rows"]
    said = f"retrain {verdict['reasons']}" if verdict["retrain"] else "no drift"
    print(f"monitor over {rows:,} predictions: {seconds:.2f} s ({rows / seconds:,.0f} predictions/s), peak RSS "
          f"{peak_mib:.0f} MiB, {os.cpu_count()} cores; verdict: {said}")
    met = rows >= 1_000_000 and seconds <= 15
    print(f"goal, 1,000,000 predictions in <= 15 s: {'met' if met else 'not met' if rows >= 1_000_000 else 'n/a'}")


def _fill(url: str, data: Path, rows: int, cache: Path) -> None:
    """Records whose statistics and classes are resampled from the monitor's reference (so: no drift), in bulk."""
    reference = load_reference(data, None, None, cache_dir=cache)
    rng = np.random.default_rng(0)
    engine = predlog.make_engine(url)
    # Named, in the order of the rows below (the others take their defaults); the experiment is the config's name.
    columns = ["ts", "request_id", "model_version", "class_id", "class_name", "confidence", "entropy", "top_k",
               "latency_ms", "width", "height", *STAT_NAMES, *predlog.EMBEDDING_COLUMNS, "experiment"]
    postgresql = engine.dialect.name == "postgresql"
    sql = f"INSERT INTO predictions ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
    classes = reference.class_counts / reference.class_counts.sum()
    for start in range(0, rows, 100_000):
        n = min(100_000, rows - start)
        labels = rng.choice(len(classes), n, p=classes)
        confidence = rng.uniform(0.6, 1.0, n)
        sizes = np.column_stack([rng.choice(reference.samples[name], n) for name in ("width", "height")])
        stats = np.column_stack([rng.choice(reference.samples[name], n) for name in STAT_NAMES])
        numbers = np.column_stack([labels, confidence, rng.uniform(0, 1, n), rng.gamma(4, 1.0, n),
                                   sizes, stats, rng.normal(0, 1, (n, len(predlog.EMBEDDING_COLUMNS)))])
        batch = [(float(start + i), f"r{start + i}", "v1", int(row[0]), "c", float(row[1]), float(row[2]), "[]",
                  float(row[3]), int(row[4]), int(row[5]), *row[6 : 6 + len(STAT_NAMES)].tolist(),
                  *row[6 + len(STAT_NAMES):].tolist(), "scale") for i, row in enumerate(numbers)]
        if postgresql:  # COPY: ~10x executemany's rows per second
            raw = engine.raw_connection()
            try:
                with raw.cursor() as cursor, cursor.copy(f"COPY predictions ({', '.join(columns)}) FROM STDIN") as copy:
                    for row in batch:
                        copy.write_row(row)
                raw.commit()
            finally:
                raw.close()
        else:
            with engine.begin() as conn:
                conn.exec_driver_sql(sql, batch)
    engine.dispose()


if __name__ == "__main__":
    main()
