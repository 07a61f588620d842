"""consa: learn hybrid full / sliding-window attention allocations for Hugging Face causal LMs.

``consa_cli.load_hybrid(path)`` loads a ``consa export`` directory as a ready transformers model;
``consa_cli.Allocation`` is the allocation type every stage reads and writes.
"""

__version__ = "0.1.0"

__all__ = ["Allocation", "load_hybrid", "__version__"]


def __getattr__(name: str):
    # Lazy, so `import consa_cli` (and `consa --help`) stays fast: torch and transformers load on first use.
    if name == "load_hybrid":
        from consa_cli.export import load_hybrid

        return load_hybrid
    if name == "Allocation":
        from consa_cli.allocation import Allocation

        return Allocation
    raise AttributeError(f"module 'consa_cli' has no attribute {name!r}")
