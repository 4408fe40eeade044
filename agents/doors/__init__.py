"""Doors: room doors, lockers and key cabinets as pure logic behind an explicit I/O boundary (docs/doors.md).

``machine`` is one door's lock/sensor state machine, ``checks`` decides a single card tap from the
cached signed policy, ``access`` adds the steps that span taps (PIN, two-person, escort,
anti-passback), ``cabinet`` keeps the key-lending register of key cabinets, ``store`` persists what
must survive a restart, and ``service.DoorAgentCore`` ties them to the agent's outbox, the lock board
and the readers.
"""
