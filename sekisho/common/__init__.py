"""Helpers shared by every layer; this package imports nothing else of sekisho."""
