"""largebatch: reproduce and extend large-batch training (LAMB, LEGW)."""

__version__ = "0.1.0"
