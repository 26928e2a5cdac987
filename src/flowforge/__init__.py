"""flowforge: normalizing flows in plain PyTorch.

The math core (:mod:`flowforge.flows`, :mod:`flowforge.nn`) imports neither Lightning nor Hydra;
:mod:`flowforge.training` and :mod:`flowforge.data` wrap it for experiments.
"""

__version__ = "0.1.0"
