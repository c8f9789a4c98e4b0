"""The prediction log's tables, as Signpost made them when migrations began.

``predictions`` (one row per answered image) and ``request_errors`` (one row per prediction request answered with
an error), with their indexes.

A frozen copy of ``signpost.serve.predlog``'s tables at that time: later changes to them are later revisions.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

UNKNOWN_EXPERIMENT = "(unknown)"  # the experiment of rows written before rows named one
STATS = ("brightness", "contrast", "sharpness", "red", "green", "blue", "saturation")
EMBEDDINGS = tuple(f"emb{i}" for i in range(8))


def upgrade() -> None:
    op.create_table(
        "predictions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("ts", sa.Float, nullable=False),
        sa.Column("request_id", sa.String(36), nullable=False),
        sa.Column("model_version", sa.String(200), nullable=False),
        sa.Column("experiment", sa.String(200), nullable=False, server_default=UNKNOWN_EXPERIMENT),
        sa.Column("data_key", sa.String(100), nullable=False, server_default=""),
        sa.Column("model_key", sa.String(100), nullable=False, server_default=""),
        sa.Column("class_id", sa.Integer, nullable=False),
        sa.Column("class_name", sa.String(200), nullable=False),
        sa.Column("confidence", sa.Float, nullable=False),
        sa.Column("entropy", sa.Float, nullable=False),
        sa.Column("top_k", sa.Text, nullable=False),
        sa.Column("latency_ms", sa.Float, nullable=False),
        sa.Column("width", sa.Integer, nullable=False),
        sa.Column("height", sa.Integer, nullable=False),
        sa.Column("orientation", sa.Integer, nullable=False, server_default="1"),
        *(sa.Column(name, sa.Float, nullable=False) for name in (*STATS, *EMBEDDINGS)),
    )
    op.create_index("ix_predictions_ts", "predictions", ["ts"])
    op.create_index("ix_predictions_experiment", "predictions", ["experiment"])
    op.create_table(
        "request_errors",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("ts", sa.Float, nullable=False),
        sa.Column("route", sa.String(100), nullable=False),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("code", sa.String(100), nullable=False),
        sa.Column("experiment", sa.String(200), nullable=False, server_default=UNKNOWN_EXPERIMENT),
    )
    op.create_index("ix_request_errors_ts", "request_errors", ["ts"])


def downgrade() -> None:
    op.drop_table("request_errors")
    op.drop_table("predictions")
