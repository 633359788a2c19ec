"""The executor: carries a plan out, chunk by chunk, from the strategy into the sink."""
from __future__ import annotations

from ._function import chunk_args
from ._plan import Plan
from ._sinks import MemorySink
from ._spec import Spec
from ._strategies import STRATEGIES


def execute(spec: Spec, plan: Plan):
    strategy = STRATEGIES[plan.strategy]
    sink = MemorySink(plan.batch_size, differentiable=spec.create_graph, keep_outputs=spec.return_outputs)
    for start, stop in plan.chunks():
        jacs, outputs = strategy(spec, plan, chunk_args(spec, start, stop), stop - start)
        sink.write(start, stop, jacs, outputs)
    jacs = sink.jacobians()
    result = jacs[0] if spec.single else tuple(jacs)
    return (result, sink.outputs()) if spec.return_outputs else result
