"""
`twistd keychestamp`: the plugin is a bare ServiceMaker; everything else lives
in keychestamp.service. This directory must not have an __init__.py.
"""

from twisted.application.service import ServiceMaker

keychestamp = ServiceMaker(
    "keychestamp",
    "keychestamp.tap",
    "Pass-through MITM proxy that turns ACMEv2 exchanges into JSON events",
    "keychestamp",
)
