"""A log made before migrations, brought to revision 0001's shape, its rows kept.

Such a log has no version table; ``signpost.serve.predlog`` stamps it at 0001 (its ``predictions`` table exists)
and this revision adds what the older Signpost had not made yet, as its ``_add_new_columns`` did before: the
columns ``orientation``, ``experiment``, ``data_key`` and ``model_key`` (old rows get the default, so their
experiment reads as ``(unknown)``, no experiment's name), the ``request_errors`` table, and the indexes. On a log
that 0001 made, or one already complete, it changes nothing.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

UNKNOWN_EXPERIMENT = "(unknown)"
# (table, column, type, default) added since the first prediction logs, in the order Signpost added them.
LATER_COLUMNS = (
    ("predictions", "orientation", sa.Integer(), "1"),
    ("predictions", "experiment", sa.String(200), UNKNOWN_EXPERIMENT),
    ("predictions", "data_key", sa.String(100), ""),
    ("predictions", "model_key", sa.String(100), ""),
    ("request_errors", "experiment", sa.String(200), UNKNOWN_EXPERIMENT),
)
INDEXES = (("ix_predictions_ts", "predictions", "ts"), ("ix_predictions_experiment", "predictions", "experiment"),
           ("ix_request_errors_ts", "request_errors", "ts"))


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    if not inspector.has_table("request_errors"):  # logs older than the error rate
        op.create_table(
            "request_errors",
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("ts", sa.Float, nullable=False),
            sa.Column("route", sa.String(100), nullable=False),
            sa.Column("status", sa.Integer, nullable=False),
            sa.Column("code", sa.String(100), nullable=False),
            sa.Column("experiment", sa.String(200), nullable=False, server_default=UNKNOWN_EXPERIMENT),
        )
    have = {table: {c["name"] for c in inspector.get_columns(table)} for table in ("predictions", "request_errors")}
    for table, name, type_, default in LATER_COLUMNS:
        if name not in have[table]:
            # NOT NULL with a default: SQLite and PostgreSQL both fill the existing rows with it.
            op.add_column(table, sa.Column(name, type_, nullable=False, server_default=default))
    for index, table, column in INDEXES:
        if index not in {i["name"] for i in inspector.get_indexes(table)}:
            op.create_index(index, table, [column])


def downgrade() -> None:
    """Nothing: which of these an older log lacked is not recorded, and 0001 has them all."""
