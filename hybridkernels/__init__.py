"""hybridkernels: GPU kernels for diffusion-planner / autoregressive-executor hybrids."""

__version__ = "0.1.0"

from . import ops, reference  # noqa: E402

__all__ = ["__version__", "ops", "reference"]
