"""sonocad: train, evaluate, explain and serve CNN classifiers of breast-ultrasound lesions.

A research tool, not a diagnostic device.
"""
from .version import __version__

__all__ = ["__version__"]
