"""A stand-in Kubernetes API server on 127.0.0.1 for the real kubectl: just enough of the API for `kubectl apply`,
`kubectl rollout status`, `kubectl rollout undo` and `kubectl delete` against a kubeconfig in a temporary folder.

It answers discovery (legacy, not aggregated; no OpenAPI, so kubectl validates nothing client-side), keeps the
objects it is sent in memory, records every request, and plays the Deployment controller's part: each new pod
template of a Deployment is a ReplicaSet with the next revision, and the Deployment's status says the rollout is
complete, or, for a Deployment named in ``failing``, that it exceeded its progress deadline. Nothing runs: there
are no pods.
"""

from __future__ import annotations

import copy
import json
import threading
import urllib.parse
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

# group/version -> resource -> (kind, namespaced)
RESOURCES: dict[str, dict[str, tuple[str, bool]]] = {
    "v1": {"configmaps": ("ConfigMap", True), "services": ("Service", True), "secrets": ("Secret", True),
           "namespaces": ("Namespace", False), "pods": ("Pod", True)},
    "apps/v1": {"deployments": ("Deployment", True), "replicasets": ("ReplicaSet", True)},
    "autoscaling/v2": {"horizontalpodautoscalers": ("HorizontalPodAutoscaler", True)},
    "policy/v1": {"poddisruptionbudgets": ("PodDisruptionBudget", True)},
}
VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]
REVISION = "deployment.kubernetes.io/revision"


@dataclass
class FakeCluster:
    """The API server's state: objects by (group/version, resource, namespace, name), and the requests made."""

    failing: set[str] = field(default_factory=set)  # Deployments whose rollouts fail
    objects: dict[tuple[str, str, str, str], dict[str, Any]] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path with query)
    lock: threading.Lock = field(default_factory=threading.Lock)
    version: int = 0

    def deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.objects.get(("apps/v1", "deployments", namespace, name))

    def replica_sets(self, namespace: str, name: str) -> list[dict[str, Any]]:
        owner = self.deployment(namespace, name)
        uid = owner["metadata"]["uid"] if owner else None
        return [obj for (gv, res, ns, _), obj in self.objects.items() if res == "replicasets" and ns == namespace
                and any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences", []))]

    def _next_version(self) -> str:
        self.version += 1
        return str(self.version)

    def store(self, gv: str, resource: str, namespace: str, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        meta = obj.setdefault("metadata", {})
        if namespace:
            meta["namespace"] = namespace
        if old is None:
            meta.update(uid=str(uuid.uuid4()), creationTimestamp="2026-01-01T00:00:00Z", generation=1)
        else:
            meta.update(uid=old["metadata"]["uid"], creationTimestamp=old["metadata"]["creationTimestamp"],
                        generation=old["metadata"].get("generation", 1)
                        + (obj.get("spec") != old.get("spec")))
        meta["resourceVersion"] = self._next_version()
        self.objects[(gv, resource, namespace, meta["name"])] = obj
        if resource == "deployments":
            self._control(namespace, obj)

    def _control(self, namespace: str, deployment: dict[str, Any]) -> None:
        """The Deployment controller, at once: a ReplicaSet per pod template, the rollout's outcome as status."""
        meta, spec = deployment["metadata"], deployment["spec"]
        template = {k: v for k, v in copy.deepcopy(spec["template"]).items()}
        owned = self.replica_sets(namespace, meta["name"])
        current = next((rs for rs in owned if _template(rs) == _template({"spec": {"template": template}})), None)
        revision = 1 + max((int(rs["metadata"]["annotations"][REVISION]) for rs in owned), default=0)
        if current is None:
            pod_hash = uuid.uuid4().hex[:10]
            template.setdefault("metadata", {}).setdefault("labels", {})["pod-template-hash"] = pod_hash
            name = f"{meta['name']}-{pod_hash}"
            current = {"apiVersion": "apps/v1", "kind": "ReplicaSet",
                       "metadata": {"name": name, "namespace": namespace, "labels": template["metadata"]["labels"],
                                    "annotations": {REVISION: str(revision)}, "uid": str(uuid.uuid4()),
                                    "resourceVersion": self._next_version(),
                                    "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment",
                                                         "name": meta["name"], "uid": meta["uid"],
                                                         "controller": True}]},
                       "spec": {"replicas": spec.get("replicas", 1), "selector": spec["selector"],
                                "template": template}}
            self.objects[("apps/v1", "replicasets", namespace, name)] = current
        else:
            current["metadata"]["annotations"][REVISION] = str(revision)
        meta.setdefault("annotations", {})[REVISION] = current["metadata"]["annotations"][REVISION]
        replicas = spec.get("replicas", 1)
        if meta["name"] in self.failing:
            progressing = {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                           "message": f'ReplicaSet "{current["metadata"]["name"]}" has timed out progressing.'}
            ready = 0
        else:
            progressing = {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable",
                           "message": f'ReplicaSet "{current["metadata"]["name"]}" has successfully progressed.'}
            ready = replicas
        deployment["status"] = {
            "observedGeneration": meta["generation"], "replicas": replicas, "updatedReplicas": replicas,
            "readyReplicas": ready, "availableReplicas": ready, "unavailableReplicas": replicas - ready,
            "conditions": [{"type": "Available", "status": "True" if ready else "False"}, progressing]}


def _template(rs: dict[str, Any]) -> Any:
    """A pod template without the hash label the controller adds: what tells two revisions apart."""
    template = copy.deepcopy(rs["spec"]["template"])
    template.get("metadata", {}).get("labels", {}).pop("pod-template-hash", None)
    return template


def _merge(target: Any, patch: Any) -> Any:
    """A strategic merge patch as kubectl sends it, simplified: maps merge, lists of named maps merge by name,
    other lists are replaced, None deletes, ``$``-directives are dropped."""
    if not isinstance(patch, dict) or not isinstance(target, dict):
        return copy.deepcopy(patch)
    merged = copy.deepcopy(target)
    for key, value in patch.items():
        if key.startswith("$"):
            continue
        if value is None:
            merged.pop(key, None)
        elif (isinstance(value, list) and isinstance(merged.get(key), list) and value
              and all(isinstance(v, dict) and "name" in v for v in value)):
            by_name = {item.get("name"): item for item in merged[key] if isinstance(item, dict)}
            merged[key] = [_merge(by_name.get(v["name"], {}), v) for v in value]
        else:
            merged[key] = _merge(merged.get(key), value)
    return merged


def _json_patch(target: dict[str, Any], operations: list[dict[str, Any]]) -> dict[str, Any]:
    patched = copy.deepcopy(target)
    for op in operations:
        assert op["op"] in ("add", "replace"), op
        *parents, last = [part.replace("~1", "/").replace("~0", "~") for part in op["path"].split("/")[1:]]
        node = patched
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = op["value"]
    return patched


class _Handler(BaseHTTPRequestHandler):
    cluster: FakeCluster
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _status(self, code: int, reason: str, message: str) -> None:
        self._send(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
                          "reason": reason, "code": code})

    def _route(self) -> tuple[str, str, str, str | None, dict[str, list[str]]] | None:
        """(group/version, resource, namespace, name, query) of an object path, None for other paths."""
        url = urllib.parse.urlsplit(self.path)
        parts = url.path.strip("/").split("/")
        if parts[0] == "api":
            gv, rest = "v1", parts[2:]
        elif parts[0] == "apis" and len(parts) >= 3:
            gv, rest = f"{parts[1]}/{parts[2]}", parts[3:]
        else:
            return None
        namespace = ""
        if len(rest) >= 2 and rest[0] == "namespaces" and len(rest) != 2:
            namespace, rest = rest[1], rest[2:]
        if not rest or gv not in RESOURCES or rest[0] not in RESOURCES[gv]:
            return None
        return gv, rest[0], namespace, rest[1] if len(rest) > 1 else None, urllib.parse.parse_qs(url.query)

    def _body(self) -> Any:
        return json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"null")

    def do_GET(self) -> None:
        cluster = self.cluster
        cluster.requests.append(("GET", self.path))
        path = urllib.parse.urlsplit(self.path).path.rstrip("/")
        if path == "/openapi/v2":
            # An empty protobuf message: a Document with no definitions, so kubectl's client-side validation has no
            # schema to check against and skips (the tests check every object against the real schemas instead).
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        if path == "/version":
            return self._send(200, {"major": "1", "minor": "32", "gitVersion": "v1.32.0", "platform": "linux/amd64"})
        if path == "/api":
            return self._send(200, {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []})
        if path == "/apis":
            groups = [{"name": gv.split("/")[0], "versions": [{"groupVersion": gv, "version": gv.split("/")[1]}],
                       "preferredVersion": {"groupVersion": gv, "version": gv.split("/")[1]}}
                      for gv in RESOURCES if "/" in gv]
            return self._send(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
        gv = path.removeprefix("/api/").removeprefix("/apis/")
        if gv in RESOURCES:
            resources = [{"name": res, "singularName": kind.lower(), "namespaced": namespaced, "kind": kind,
                          "verbs": VERBS} for res, (kind, namespaced) in RESOURCES[gv].items()]
            return self._send(200, {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv,
                                    "resources": resources})
        route = self._route()
        if route is None:
            return self._status(404, "NotFound", f"the server could not find the requested resource ({path})")
        gv, resource, namespace, name, query = route
        kind = RESOURCES[gv][resource][0]
        with cluster.lock:
            if name is not None:
                obj = cluster.objects.get((gv, resource, namespace, name))
                if obj is None:
                    return self._status(404, "NotFound", f'{resource} "{name}" not found')
                return self._send(200, obj)
            items = [obj for (g, r, ns, n), obj in cluster.objects.items()
                     if g == gv and r == resource and ns == namespace and _selected(obj, query)]
        if query.get("watch") == ["true"] or query.get("watch") == ["1"]:
            return self._watch()
        return self._send(200, {"kind": f"{kind}List", "apiVersion": gv,
                                "metadata": {"resourceVersion": str(cluster.version)}, "items": items})

    def _watch(self) -> None:
        """A watch that sends no events: the state is settled when an object is written. It ends after 5 s,
        as a watch may; kubectl has decided from its list by then."""
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        threading.Event().wait(5)
        self.wfile.write(b"0\r\n\r\n")

    def do_POST(self) -> None:
        self.cluster.requests.append(("POST", self.path))
        route = self._route()
        if route is None:
            return self._status(404, "NotFound", "not found")
        gv, resource, namespace, _, _ = route
        obj = self._body()
        with self.cluster.lock:
            key = (gv, resource, namespace, obj["metadata"]["name"])
            if key in self.cluster.objects:
                return self._status(409, "AlreadyExists", f'{resource} "{key[3]}" already exists')
            self.cluster.store(gv, resource, namespace, obj, None)
        self._send(201, obj)

    def do_PATCH(self) -> None:
        self.cluster.requests.append(("PATCH", self.path))
        route = self._route()
        if route is None or route[3] is None:
            return self._status(404, "NotFound", "not found")
        gv, resource, namespace, name, _ = route
        patch = self._body()
        with self.cluster.lock:
            old = self.cluster.objects.get((gv, resource, namespace, name))
            if old is None:
                return self._status(404, "NotFound", f'{resource} "{name}" not found')
            if "json-patch" in self.headers.get("Content-Type", ""):
                new = _json_patch(old, patch)
            else:
                new = _merge(old, patch)
            new.pop("status", None)
            self.cluster.store(gv, resource, namespace, new, old)
        self._send(200, new)

    def do_DELETE(self) -> None:
        self.cluster.requests.append(("DELETE", self.path))
        self._body()  # DeleteOptions: read, so the connection's next request starts where it should
        route = self._route()
        if route is None or route[3] is None:
            return self._status(404, "NotFound", "not found")
        gv, resource, namespace, name, _ = route
        with self.cluster.lock:
            obj = self.cluster.objects.pop((gv, resource, namespace, name), None)
            if obj is None:
                return self._status(404, "NotFound", f'{resource} "{name}" not found')
            if resource == "deployments":
                for rs in self.cluster.replica_sets(namespace, name):
                    self.cluster.objects.pop(("apps/v1", "replicasets", namespace, rs["metadata"]["name"]))
        self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success",
                         "details": {"name": name, "kind": resource}})


def _selected(obj: dict[str, Any], query: dict[str, list[str]]) -> bool:
    """The list's fieldSelector (metadata.name=...) and labelSelector (a=b,c=d), as kubectl sends them."""
    for selector in query.get("fieldSelector", []):
        key, _, value = selector.partition("=")
        if key == "metadata.name" and obj["metadata"]["name"] != value:
            return False
    labels = obj["metadata"].get("labels", {})
    for selector in query.get("labelSelector", []):
        for term in filter(None, selector.split(",")):
            key, _, value = term.partition("=")
            if labels.get(key) != value:
                return False
    return True


@contextmanager
def fake_cluster(folder: Path, failing: set[str] | None = None) -> Iterator[tuple[FakeCluster, Path]]:
    """The API server on 127.0.0.1 and a kubeconfig (in ``folder``) whose current context is it."""
    cluster = FakeCluster(failing=failing or set())
    handler = type("Handler", (_Handler,), {"cluster": cluster})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    kubeconfig = folder / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{server.server_address[1]}"}}],
        "users": [{"name": "fake", "user": {"token": "fake"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}]}))
    try:
        yield cluster, kubeconfig
    finally:
        server.shutdown()
        server.server_close()
