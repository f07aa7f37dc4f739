"""sparsellm: prune causal language models layer by layer, globally (SparseLLM) or locally
(SparseGPT, Wanda, magnitude)."""

from sparsellm.api import evaluate_perplexity, prune_model
from sparsellm.compressed import load_model
from sparsellm.masks import SparsityTarget
from sparsellm.report import PruneReport

__version__ = "0.1.0"

__all__ = [
    "PruneReport",
    "SparsityTarget",
    "__version__",
    "evaluate_perplexity",
    "load_model",
    "prune_model",
]
