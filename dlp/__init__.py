"""Dynamic Layerwise Pruning: the algorithm library."""
__version__ = "0.1.0"
