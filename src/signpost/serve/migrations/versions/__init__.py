"""The revisions, oldest first: 0001 the tables, 0002 an older log brought to their shape, 0003 devices
(``predictions.device_id`` and ``ingest_batches``)."""
