"""Sparse inference on the CPU: :class:`SparseLinear` holds a pruned Linear layer's non-zeros
in a packed layout read by numba kernels (``pip install 'sparsellm[infer]'``), and
:func:`to_sparse_inference` swaps a pruned model's sparse layers for it.

See ``docs/ARCHITECTURE.md``, "Sparse inference", for the layout and the crossovers.
"""

from sparsellm.sparse.convert import SparseSwap, to_sparse_inference, weight_bytes_per_token
from sparsellm.sparse.fuse import fuse_shared_inputs
from sparsellm.sparse.linear import SparseLinear, kernel_token_limit, kernel_unavailable

__all__ = [
    "SparseLinear",
    "SparseSwap",
    "fuse_shared_inputs",
    "kernel_token_limit",
    "kernel_unavailable",
    "to_sparse_inference",
    "weight_bytes_per_token",
]
