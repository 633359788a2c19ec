"""chunkjac: exact per-sample Jacobians of PyTorch models over very large batches.

    J = chunkjac.compute(model, x, budget="20GB")     # (B, *out, *in), J[i] = dy_i/dx_i
"""
from ._api import bilaplacian, compute, derivatives, divergence, hessian, laplacian, operator, plan
from ._call import plan_cache, probe_cache
from ._declared import hops
from ._errors import BudgetError, CouplingError, CouplingWarning, DistributedError, TooLongError
from ._graph import jacobian_of
from ._memo import ProbeCache
from ._plan import Plan
from ._plancache import PlanCache
from ._projection import Projection
from ._version import __version__

__all__ = ["compute", "hessian", "laplacian", "bilaplacian", "divergence", "derivatives", "operator", "Projection", "plan", "jacobian_of", "hops", "Plan", "BudgetError", "CouplingError",
           "CouplingWarning", "DistributedError", "TooLongError",
           "ProbeCache", "probe_cache", "PlanCache", "plan_cache", "__version__"]


def __dir__() -> list[str]:
    return sorted(__all__)
