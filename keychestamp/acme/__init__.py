"""
ACME knowledge: the classifier that turns relayed exchanges into ACME events,
JWS decoding, and per-server directory memory.
"""

from keychestamp.acme.classifier import PROXY_ERROR, AcmeClassifier, IEventLogger
from keychestamp.acme.directory import AcmeKnowledge
from keychestamp.acme.params import EVENT_TYPES

__all__ = ["EVENT_TYPES", "PROXY_ERROR", "AcmeClassifier", "AcmeKnowledge", "IEventLogger"]
