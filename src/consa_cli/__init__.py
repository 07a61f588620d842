"""consa: learn hybrid full / sliding-window attention allocations for Hugging Face causal LMs."""

__version__ = "0.1.0"
