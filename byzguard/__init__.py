"""byzguard core: decode, verify and stamp inter-service events. Imports neither faust nor kafka."""

__version__ = "0.1.0"
