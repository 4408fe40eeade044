"""Simulated endpoint traffic for the demo, driven by the signed policy the agent holds."""
