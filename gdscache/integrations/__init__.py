"""Adapters that plug gdscache into serving engines (each imports its engine lazily)."""
