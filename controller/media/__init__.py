"""Electronic media (電子媒体台帳), their loans (貸出記録), inventory (棚卸し) and overdue checks."""
