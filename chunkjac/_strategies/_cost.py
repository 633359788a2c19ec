"""The cost model's units, shared by the strategies' candidates: batched products over a chunk, a
VJP row counting 1 (about two forward passes' worth of work).

# NOTE: [Choosing the AD mode]
# The sum trick costs one forward plus one VJP per per-sample output element in reverse mode, or one
# JVP per per-sample input element in forward mode; a JVP column costs about twice a VJP row here
# (JVP_COST), so forward mode ranks first where 2 * n_in < n_out. Both can vectorise several rows
# (columns) in one call (is_grads_batched / vmap) or loop over them, at the same count: which is
# faster depends on the model (1e5 samples: sin 3x faster vectorised, the PINN MLP 3->128x3->3 1.3x
# faster looped), so candidates of equal cost are timed on the run's own first chunks (see
# [Timing on the run's first chunks] in _executor). Shared tensors (a parameter, an unbatched input)
# use forward mode (one JVP per element gives every sample's column) or the per-sample strategy
# (each sample a batch of one under vmap: about PER_SAMPLE_COST VJP rows' worth per output element).
"""
JVP_COST = 2.0
PER_SAMPLE_COST = 8.0
SECOND_VJP_COST = 2.0   # a VJP through a VJP's graph (reverse over reverse), in VJP rows
MAX_VECTORISED = 4096   # rows (columns) in one vectorised call at most
BLOCK = 16
