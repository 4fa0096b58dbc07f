"""sonocad: train, evaluate, explain and serve CNN classifiers of breast-ultrasound lesions.

A research tool, not a diagnostic device.
"""
__version__ = "0.1.0"
