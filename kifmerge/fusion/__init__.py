"""Fusion: pure per-unit rules (`rules`) and the streaming engine that applies them (`engine`)."""
