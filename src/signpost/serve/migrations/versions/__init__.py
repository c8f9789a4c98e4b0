"""The revisions, oldest first: 0001 the tables, 0002 an older log brought to their shape."""
