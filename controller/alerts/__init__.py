"""Alerts (issue 13): rules that turn events and conditions into alerts, their lifecycle, escalation and channels."""
