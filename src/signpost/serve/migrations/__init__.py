"""The prediction log's Alembic migrations (run by ``signpost.serve.predlog.migrate``; see env.py)."""
