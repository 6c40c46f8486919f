"""m3i: all-in-one pre-training by maximizing multi-modal mutual information."""

__version__ = "0.1.0"
