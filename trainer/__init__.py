"""Offline training: `trainer fit | report | sweep | export`."""
