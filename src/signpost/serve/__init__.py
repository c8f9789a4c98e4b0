"""The HTTP inference service (``signpost serve``): FastAPI on uvicorn, with request batching and a prediction log.

- ``app``: the app factory, routes and error handling;
- ``model``: which model to serve (path, bench candidate or registry alias), loading and the forward pass;
- ``batching``: concurrent requests gathered into one forward pass;
- ``predlog``: every prediction written off the request path to SQLite (WAL) or any SQLAlchemy URL;
- ``schemas``: the request and response models.
"""
