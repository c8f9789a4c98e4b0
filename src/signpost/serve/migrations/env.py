"""Alembic's environment for the prediction log's migrations.

``signpost.serve.predlog`` runs these itself, with a Config it builds in code and the connection it holds (inside
the transaction that serialises concurrent upgrades): no alembic.ini is needed, and none is shipped. The revisions
in ``versions/`` are frozen copies of the schema at each step, so they import nothing from Signpost.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

config = context.config
version_table = config.get_main_option("version_table", "prediction_log_version")
connection = config.attributes.get("connection")
if connection is not None:  # signpost's own run: its connection, inside its transaction
    context.configure(connection=connection, version_table=version_table)
    with context.begin_transaction():
        context.run_migrations()
else:  # an operator's own `alembic` run with sqlalchemy.url set in a Config of theirs
    engine = create_engine(config.get_main_option("sqlalchemy.url"))
    with engine.begin() as conn:
        context.configure(connection=conn, version_table=version_table)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()
