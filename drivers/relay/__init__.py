"""Relay-only lock boards: the common USB HID relay boards (``drivers.relay.hid``, pyusb). Each is a ``LockIO``."""
