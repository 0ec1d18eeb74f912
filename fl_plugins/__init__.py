"""fl-plugins: federated fine-tuning for PyTorch Lightning and Hugging Face Trainer.

Importing this package is cheap: it loads no torch, lightning, transformers or grpc. The client API lives
in `fl_plugins.client` (`import fl_plugins.client as flare`).
"""

from fl_plugins._version import __version__
from fl_plugins.errors import (
    AuthError,
    ConfigError,
    FLError,
    IntegrityError,
    MissingDependencyError,
    ModelMismatchError,
    PolicyError,
    ProtocolError,
    RoundError,
    TransportError,
)

__all__ = [
    "AuthError",
    "ConfigError",
    "FLError",
    "IntegrityError",
    "MissingDependencyError",
    "ModelMismatchError",
    "PolicyError",
    "ProtocolError",
    "RoundError",
    "TransportError",
    "__version__",
]
