"""Offline training and evaluation of the adapter (no Ray here; `services/` runs it on Ray Train)."""
