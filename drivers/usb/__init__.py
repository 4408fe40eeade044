"""USB driver: devices from sysfs, authorisation files, hot-plug events. Only this package imports pyudev/pyusb."""

from sekisho.drivers.usb.errors import UsbAccessError, UsbDescriptorError, UsbDeviceGone, UsbError
from sekisho.drivers.usb.events import HotplugSource, InjectedHotplug, UdevHotplug, UsbAction, UsbEvent, UsbObserver
from sekisho.drivers.usb.libusb import DescriptorDetails, descriptor_details
from sekisho.drivers.usb.model import UsbDevice, UsbInterface, compute_device_hash, mask_serial
from sekisho.drivers.usb.sysfs import DEFAULT_SYSFS_ROOT, ScanResult, SysfsUsb

__all__ = [
    "DEFAULT_SYSFS_ROOT",
    "DescriptorDetails",
    "HotplugSource",
    "InjectedHotplug",
    "ScanResult",
    "SysfsUsb",
    "UdevHotplug",
    "UsbAccessError",
    "UsbAction",
    "UsbDescriptorError",
    "UsbDevice",
    "UsbDeviceGone",
    "UsbError",
    "UsbEvent",
    "UsbInterface",
    "UsbObserver",
    "compute_device_hash",
    "descriptor_details",
    "mask_serial",
]
