"""One module per lifecycle stage. Stages meet only at artifacts on disk and import no other stage."""
