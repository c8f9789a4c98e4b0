"""The HTTP inference service (``signpost serve``): FastAPI on uvicorn, with request batching and a prediction log.

- ``app``: the app factory (``create_app``) and its lifespan;
- ``state``: what a running service holds (``ServerState``), and the dependency the routes read it through;
- ``routes``: the routes on an ``APIRouter``, with the API key and admin key as dependencies;
- ``oip``: the Open Inference Protocol (KServe v2 / Triton REST) routes, through the same prediction path;
- ``uploads``: uploads read (body limit and deadline, multipart, content types) and decoded within a budget;
- ``predict``: a prediction request's way from image bytes to its answer and log record;
- ``errors``: errors as HTTP answers with one JSON shape, and messages without paths for strangers;
- ``metrics``: the Prometheus metrics and the middleware that counts requests;
- ``server``: uvicorn, with deadlines and limits for slow, idle and crowding clients;
- ``model``: which model to serve (path, bench candidate or registry alias), loading and the forward pass;
- ``batching``: concurrent requests gathered into one forward pass;
- ``predlog``: the prediction log's tables in SQLite (WAL) or any SQLAlchemy URL, and the monitor's queries;
- ``predlog_writer``: every prediction written to the log off the request path;
- ``schemas``: the request and response models.
"""
