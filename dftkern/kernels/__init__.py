"""Pure Triton kernels (no autograd): row-wise log-softmax epilogues over fp32 logit chunks.

The matrix products (``hidden @ weight.T`` and the two gradient products) are done by the
vendor BLAS through :mod:`dftkern.engines`; these kernels do everything that touches a
logit: bias, temperature, softcap, the log-sum-exp, the target gather and the gradient
``g * (onehot - softmax) * dz/dlogit``, in one or two streaming passes per row.
"""

from .logprob_rows import launch_row_grad, launch_row_lse_target

__all__ = ["launch_row_lse_target", "launch_row_grad"]
