"""Devices in the log: a ``device_id`` on every prediction, and the ``ingest_batches`` a device has sent.

``predictions.device_id`` names the device that made a prediction and shipped it to the server's ingest route;
``""`` is the server itself, and every row already in the log gets it (they are all the server's own). Indexed:
the monitor groups the window by it (``signpost monitor --by device``).

``ingest_batches`` holds one row per batch a device shipped, keyed by (device, the device's batch id): the ingest
route inserts it in the same transaction as the batch's predictions, so a retried batch finds it and is stored once.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Each step only when missing, as in 0002: a log made before migrations by a Signpost that had these is stamped
    # at 0001 and comes through here too.
    inspector = sa.inspect(op.get_bind())
    if "device_id" not in {c["name"] for c in inspector.get_columns("predictions")}:
        # NOT NULL with a default: SQLite and PostgreSQL both fill the existing rows with it (the server's own).
        op.add_column("predictions", sa.Column("device_id", sa.String(100), nullable=False, server_default=""))
    if "ix_predictions_device_id" not in {i["name"] for i in inspector.get_indexes("predictions")}:
        op.create_index("ix_predictions_device_id", "predictions", ["device_id"])
    if not inspector.has_table("ingest_batches"):
        op.create_table(
            "ingest_batches",
            sa.Column("device_id", sa.String(100), primary_key=True),
            sa.Column("batch_id", sa.String(100), primary_key=True),
            sa.Column("received_ts", sa.Float, nullable=False),
            sa.Column("records", sa.Integer, nullable=False),
        )


def downgrade() -> None:
    op.drop_table("ingest_batches")
    with op.batch_alter_table("predictions") as batch:  # SQLite cannot drop a column in place
        batch.drop_index("ix_predictions_device_id")
        batch.drop_column("device_id")
