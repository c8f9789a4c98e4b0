"""Kubernetes objects of the Signpost service: the kustomize tree ``signpost deploy`` writes (``manifests``), and,
beside it, the alerting rules and dashboard shipped with it (``monitoring/``)."""
