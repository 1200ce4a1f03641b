"""Checkpoint discovery, format detection, key maps and strict direct-to-device loading."""
