"""Registers, timelines, the muster list and their CSV/PDF exports (issue 12): services, no web code.

``service.Reports`` is the entry point the console pages, the JSON API and the CLI share; docs/registers.md
describes each register, the filters and the export layouts.
"""
