"""The device side of a fleet: signed edge bundles and the agent that runs them (issue 18, README "On devices").

- ``bundle``: what ``signpost package --target edge`` writes (the ExecuTorch program, the model card, sample images
  for a self-test, a signed manifest over all of it, and a tarball), and opening one: signature and hashes checked
  before anything in it is read;
- ``update``: ``signpost edge update``: fetch a newer bundle, verify it, swap it in atomically, self-test, roll back;
- ``agent``: ``signpost edge run``: classify images from a watched folder or a loopback HTTP endpoint, keep every
  prediction in a local SQLite log, and ship them in batches to the central server's ingest route;
- ``locallog``: the agent's SQLite log (WAL): records, their batch ids and shipped state, the bounded buffer;
- ``shipper``: batches to ``POST /v1/predictions/ingest`` with the device's key, backoff with jitter.

Nothing here imports FastAPI, MLflow, SQLAlchemy or the training code: ``pip install 'signpost[edge]'`` is enough.
"""
