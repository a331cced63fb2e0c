"""
Logging services that events go to: the JSON-lines file observer and the
KeyChest poster. Each provides L{keychestamp.events.IEventSink}.
"""

__all__: list = []
