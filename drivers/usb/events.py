"""Hot-plug events: a source protocol, an injected source for tests/demo/bench, and pyudev's monitor.

Sources report upward to observers (``subscribe``); they never call into the agent that owns them.
An ``add`` event carries the device as read from sysfs, or the ``UsbDescriptorError`` explaining why
it could not be read — the caller then blocks the device as unknown.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from sekisho.drivers.usb.errors import UsbDescriptorError, UsbDeviceGone
from sekisho.drivers.usb.model import UsbDevice
from sekisho.drivers.usb.sysfs import SysfsUsb, is_device_name

UsbAction = Literal["add", "remove"]
UsbObserver = Callable[["UsbEvent"], None]

_LOG = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class UsbEvent:
    """A device was plugged in (``add``) or removed (``remove``)."""

    action: UsbAction
    sys_name: str
    device: UsbDevice | None = None
    error: UsbDescriptorError | None = None


class HotplugSource(Protocol):
    """Something that reports USB add/remove events to subscribed observers."""

    def subscribe(self, callback: UsbObserver) -> Callable[[], None]:
        """Register an observer; return a function that unsubscribes it."""
        ...

    def start(self) -> None:
        """Begin delivering events."""
        ...

    def stop(self) -> None:
        """Stop delivering events; idempotent."""
        ...


class _Observers:
    """Observer list shared by the sources; one failing observer does not starve the others."""

    def __init__(self) -> None:
        self._callbacks: list[UsbObserver] = []
        self._lock = threading.Lock()

    def subscribe(self, callback: UsbObserver) -> Callable[[], None]:
        """Register an observer; return a function that unsubscribes it."""
        with self._lock:
            self._callbacks.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._callbacks:
                    self._callbacks.remove(callback)

        return unsubscribe

    def deliver(self, event: UsbEvent) -> None:
        """Call every observer with the event, logging (not raising) an observer's failure."""
        with self._lock:
            callbacks = list(self._callbacks)
        for callback in callbacks:
            try:
                callback(event)
            except Exception:
                _LOG.exception("USB event observer failed on %s %s", event.action, event.sys_name)


def read_event(sysfs: SysfsUsb, action: UsbAction, sys_name: str) -> UsbEvent | None:
    """Build the event for an action, reading the device on ``add``; None if it vanished before the read."""
    if action == "remove":
        return UsbEvent(action="remove", sys_name=sys_name)
    try:
        return UsbEvent(action="add", sys_name=sys_name, device=sysfs.read_device(sys_name))
    except UsbDeviceGone:
        # Plugged and pulled before we looked: the kernel's remove event follows.
        return None
    except UsbDescriptorError as err:
        return UsbEvent(action="add", sys_name=sys_name, error=err)


class InjectedHotplug:
    """A hot-plug source driven by calls: tests, the demo and the benchmark push add/remove events."""

    def __init__(self, sysfs: SysfsUsb) -> None:
        self._sysfs = sysfs
        self._observers = _Observers()
        self._running = True

    def subscribe(self, callback: UsbObserver) -> Callable[[], None]:
        """Register an observer; return a function that unsubscribes it."""
        return self._observers.subscribe(callback)

    def start(self) -> None:
        """Begin delivering events (injected events are delivered synchronously)."""
        self._running = True

    def stop(self) -> None:
        """Stop delivering events; later injections are dropped."""
        self._running = False

    def inject_add(self, sys_name: str) -> UsbEvent | None:
        """Read the device from the tree and deliver an ``add``; return the event delivered."""
        return self._inject("add", sys_name)

    def inject_remove(self, sys_name: str) -> UsbEvent | None:
        """Deliver a ``remove``; return the event delivered."""
        return self._inject("remove", sys_name)

    def _inject(self, action: UsbAction, sys_name: str) -> UsbEvent | None:
        if not self._running:
            return None
        event = read_event(self._sysfs, action, sys_name)
        if event is not None:
            self._observers.deliver(event)
        return event


class UdevHotplug:
    """Hot-plug events from the kernel through pyudev's monitor (subsystem usb, device type usb_device)."""

    def __init__(self, sysfs: SysfsUsb | None = None) -> None:
        self._sysfs = sysfs or SysfsUsb()
        self._observers = _Observers()
        self._observer_thread: Any = None

    def subscribe(self, callback: UsbObserver) -> Callable[[], None]:
        """Register an observer; return a function that unsubscribes it."""
        return self._observers.subscribe(callback)

    def start(self) -> None:
        """Open the udev netlink monitor and deliver events from its thread."""
        if self._observer_thread is not None:
            return
        # Imported here so that the module, the agent and the tests load on machines without libudev.
        import pyudev

        context = pyudev.Context()
        monitor = pyudev.Monitor.from_netlink(context)
        monitor.filter_by(subsystem="usb", device_type="usb_device")
        # Bind the netlink socket now, not in the observer thread: a device plugged right after
        # start() returns must not be missed.
        monitor.start()
        self._observer_thread = pyudev.MonitorObserver(monitor, callback=self._on_udev_event, name="usb-hotplug")
        self._observer_thread.daemon = True
        self._observer_thread.start()

    def stop(self) -> None:
        """Stop the monitor thread; idempotent."""
        thread, self._observer_thread = self._observer_thread, None
        if thread is not None:
            thread.stop()

    def _on_udev_event(self, udev_device: Any) -> None:
        action = udev_device.action
        sys_name = udev_device.sys_name
        if action not in ("add", "remove") or not is_device_name(sys_name):
            return
        event = read_event(self._sysfs, action, sys_name)
        if event is not None:
            self._observers.deliver(event)
