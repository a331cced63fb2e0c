"""
keychestamp: a pass-through MITM proxy that turns ACMEv2 exchanges into JSON events.
"""

__version__ = "0.4.0.dev0"

__all__ = ["__version__"]
