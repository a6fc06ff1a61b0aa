"""NVSHMEM host side, module loading + launching, the device error word, events."""
