"""The admin audit trail's edges: who an operator is (CLI, API) and `sekisho audit log` (store side: store/audit.py)."""
