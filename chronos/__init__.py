"""Chronos: distributed bilevel (nested) optimization for PyTorch.

Layers (an import only points down): ``cli``/``benchmarks`` → ``distributed`` →
``communication`` → ``continuum`` → ``solver`` → ``core``.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
