"""Data stage: discover samples, decode images once, split without leaks, augment, synthesise demo data."""
from .discover import Sample, discover, resolve_classes
from .images import load_gray, load_many, load_square
from .split import stratified_group_split, undersample

__all__ = ["Sample", "discover", "resolve_classes", "load_gray", "load_many", "load_square",
           "stratified_group_split", "undersample"]
