"""
The twistd entry point: Options and makeService, as twistd's ServiceMaker
expects them in one module.
"""

from keychestamp.options import Options
from keychestamp.service import makeService

__all__ = ["Options", "makeService"]
