"""Models chunkjac was not written for: never a crash, exact or a chunkjac error that says what to do."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import chunkjac

from _reference import blocks

D = torch.float64


def run_isolated(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter: a segfault fails the test instead of the test run."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)


def test_a_model_moved_inside_fn_is_left_intact_and_exact():
    # Inside torch.func.jvp, model.to() assigns param.data a functorch wrapper that outlives the
    # transform; the next forward (the reverse-mode candidate) used to segfault.
    r = run_isolated("""
import torch, chunkjac
from torch import nn
torch.manual_seed(0)
m = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
w = m[0].weight
x = torch.randn(100, 4, dtype=torch.double)
J = chunkjac.compute(lambda z: m.to(z.device)(z), x)
ref = torch.func.vmap(torch.func.jacrev(m))(x)
torch.testing.assert_close(J, ref)
assert m[0].weight is w and isinstance(w, nn.Parameter)
m(x).sum().backward()  # the module still trains
assert w.grad is not None
print("exact")
""")
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr[-2000:]}"
    assert r.stdout.strip().endswith("exact")


X = torch.randn(20, 3, dtype=D)


@pytest.mark.parametrize("fn", [
    lambda z: torch.sin(z.detach()),
    lambda z: torch.from_numpy(torch.sin(z).detach().numpy()),
], ids=["detach", "numpy"])
def test_fn_that_leaves_autograd_is_refused_not_zero(fn):
    with pytest.raises(ValueError, match="chunkjac: fn's output is not connected to wrt=0 by autograd"):
        chunkjac.compute(fn, X)


@pytest.mark.parametrize("fn, inputs, in_dims, shape", [
    (torch.mm, (torch.randn(5, 0, dtype=D), torch.randn(0, 10, dtype=D)), (0, None), (5, 10, 0)),
    (torch.linalg.pinv, (torch.randn(4, 3, 0, dtype=D),), 0, (4, 0, 3, 3, 0)),
    (lambda z: z[:, :0], (X,), 0, (20, 0, 3)),
], ids=["mm", "pinv", "empty-output"])
def test_zero_size_per_sample_inputs_and_outputs_give_empty_jacobians(fn, inputs, in_dims, shape):
    J = chunkjac.compute(fn, inputs, in_dims=in_dims)
    assert J.shape == shape


MLP = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1))


def test_fn_failing_on_the_users_inputs_is_fns_own_error_with_a_note_naming_the_chunk():
    with pytest.raises(RuntimeError, match=r"chunkjac: fn raised RuntimeError on a chunk of \d+ of the 100 samples "
                       r"\(input 0: a torch.float32 tensor of shape \(\d+, 4\)\)") as e:
        chunkjac.compute(MLP, torch.randn(100, 4))
    assert "mat1 and mat2 shapes cannot be multiplied" in str(e.value)  # PyTorch's own error, as fn raised it
    assert e.value.__notes__[-1].startswith("chunkjac: fn raised RuntimeError")


class ModelError(ValueError):
    pass


@pytest.mark.parametrize("error", [ValueError, KeyError, ModelError])
def test_fns_own_exception_keeps_its_class(error):
    def fn(z):
        raise error("the model's own complaint")

    with pytest.raises(error) as e:  # the caller's `except ValueError:` sees it
        chunkjac.compute(fn, torch.randn(8, 3))
    assert type(e.value) is error and "the model's own complaint" in str(e.value)
    assert any("chunkjac: fn raised" in n for n in e.value.__notes__)


@pytest.mark.parametrize("x", [torch.randn(100, 3, dtype=D), torch.randn(100, 3, dtype=D).numpy()],
                         ids=["float64-tensor", "numpy"])
def test_dtype_mismatch_with_the_parameters_says_how_to_fix_it(x):
    with pytest.raises(RuntimeError, match=r"The inputs are torch.float64 but fn's parameters are torch.float32"):
        chunkjac.compute(MLP, x)


def test_shared_tensor_without_forward_formula_falls_back_to_per_sample_reverse_mode():
    c = torch.randn(4, 3, dtype=D)
    got = chunkjac.compute(lambda z, c: torch.cdist(z, c), (X, c), in_dims=(0, None), wrt=1)
    ref = torch.func.vmap(torch.func.jacrev(lambda c, z: torch.cdist(z[None], c)[0]), in_dims=(None, 0))(c, X)
    torch.testing.assert_close(got, ref)
    with pytest.raises(RuntimeError, match="forward mode cannot run fn"):
        chunkjac.compute(lambda z, c: torch.cdist(z, c), (X, c), in_dims=(0, None), wrt=1, mode="forward")


def test_strict_deprecation_filter_does_not_fail_a_default_call():
    # torch.func.jvp loads its decompositions through the deprecated torch.jit.script on first use.
    r = run_isolated("""
import torch, chunkjac
x = torch.randn(50, 2)
J = chunkjac.compute(lambda z: torch.sin(z) * z[:, :1], x, mode="forward")
print(J.shape)
""")
    r2 = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c",
                         "import torch, chunkjac\nx = torch.randn(50, 2)\n"
                         "print(chunkjac.compute(lambda z: torch.sin(z) * z[:, :1], x, mode='forward').shape)"],
                        capture_output=True, text=True, timeout=180)
    assert r.returncode == 0 and r2.returncode == 0, r2.stderr[-2000:]
    assert "Deprecat" not in r.stderr


def test_default_call_leaks_no_internal_warning():
    r = run_isolated("""
import warnings, torch, chunkjac
from torch import nn
warnings.simplefilter("always")
m = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3))
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    chunkjac.compute(m, torch.randn(500, 3))
    chunkjac.compute(lambda z: torch.sin(z), torch.randn(500, 3))
print(len(w), [str(x.message)[:80] for x in w])
""")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().startswith("0 "), r.stdout
    assert r.stderr.strip() == "", r.stderr


def test_sparse_and_meta_inputs_and_sparse_outputs_are_refused_before_any_work():
    with pytest.raises(TypeError, match="chunkjac: input 0 is a torch.sparse_csr tensor"):
        chunkjac.compute(lambda z: z.to_dense(), torch.randn(5, 5, dtype=D).to_sparse_csr())
    with pytest.raises(ValueError, match="chunkjac: input 0 is on the meta device"):
        chunkjac.compute(torch.sin, torch.randn(5, 5, device="meta"))
    with pytest.raises(TypeError, match="chunkjac: fn's output is a torch.sparse_coo tensor"):
        chunkjac.compute(lambda z: z.to_sparse(), torch.randn(5, 5, dtype=D))


def test_an_op_without_derivative_is_a_chunkjac_error_with_the_cause_chained():
    idx = torch.randint(0, 10, (5, 5))
    src = torch.randn(5, 5, dtype=D)
    with pytest.raises(RuntimeError, match="chunkjac: .*cannot differentiate") as e:
        chunkjac.compute(lambda z: torch.scatter(z, 0, idx, src, reduce="add"), torch.randn(10, 5, dtype=D))
    assert "derivative for aten::scatter is not implemented" in str(e.value.__cause__)


def test_auto_mode_leaves_a_wrong_forward_formula_for_reverse_mode():
    # max_unpool with repeated indices: PyTorch's forward-mode formula disagrees with reverse mode.
    idx = torch.zeros(3, 2, 2, 2, dtype=torch.long)  # every output lands on element 0
    vals = torch.randn(3, 2, 2, 2, dtype=D)
    fn = lambda v: torch.nn.functional.max_unpool2d(v, idx, 2, output_size=(4, 4))  # noqa: E731
    torch.testing.assert_close(chunkjac.compute(fn, vals), blocks(fn, vals))
    with pytest.raises(ValueError, match="forward-mode and reverse-mode derivatives"):
        chunkjac.compute(fn, vals, mode="forward")


def test_planning_many_products_is_bounded():
    # A shared weight of 5,120 elements: the one-JVP-per-call candidate is measured cut short, not
    # 5,120 times (see [Measuring a plan of many products]).
    import time
    torch.manual_seed(0)
    m = nn.Sequential(nn.Flatten(), nn.Linear(512, 10))
    x = torch.randn(300, 8, 8, 8)
    t = time.perf_counter()
    chunkjac.plan(m, x, wrt="1.weight")
    assert time.perf_counter() - t < 30


def test_buffers_of_a_module_held_by_a_closure_are_left_as_they_were():
    bn = nn.BatchNorm1d(3).double().train()
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    chunkjac.compute(lambda z: bn(z), torch.randn(40, 3, dtype=D), coupling="unsplittable")
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_shared_input_with_one_row_per_sample_runs_the_whole_batch_exactly():
    # addmm's bias of B rows passed as shared: fn runs only on the whole batch, and its derivatives
    # are per-sample, so the answer is exact on one chunk (an LSTM in time-major is refused instead).
    m1, m2 = torch.randn(6, 2, dtype=D), torch.randn(2, 3, dtype=D)
    z = torch.randn(6, 3, dtype=D)
    fn = lambda z: torch.addmm(z, m1, m2)  # noqa: E731
    with pytest.warns(chunkjac.CouplingWarning, match="only on the whole batch"):
        J = chunkjac.compute(fn, z)
    torch.testing.assert_close(J, blocks(fn, z))


class _Trainer:
    """A model behind a plain object: fn is its method."""

    def __init__(self):
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).double().eval()

    def f(self, x):
        return self.model(x)


def test_a_model_behind_a_plain_object_is_seen_by_the_cache_and_left_as_it_was():
    t, x = _Trainer(), torch.randn(8, 3, dtype=D)
    torch.testing.assert_close(chunkjac.compute(t.f, x), blocks(t.f, x))
    t.model.train()  # a training flag inside the object: decided again, and coupled now
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    with pytest.warns(chunkjac.CouplingWarning):
        J = chunkjac.compute(t.f, x)
    after = {k: v.clone() for k, v in t.model.state_dict().items()}
    for k in before:
        assert torch.equal(before[k], after[k]), k  # running statistics untouched by compute
    torch.testing.assert_close(J, blocks(t.f, x))


def test_neighbour_lists_edited_in_place_are_decided_again():
    torch.manual_seed(0)
    x = torch.randn(6, 2, dtype=D)
    f = lambda x, P: x * (P @ x)  # noqa: E731
    nb = [[] for _ in range(6)]
    for perm in ([1, 0, 3, 2, 5, 4], [2, 3, 0, 1, 5, 4], [5, 4, 3, 2, 1, 0], [0, 2, 1, 4, 3, 5]):
        for i in range(6):
            nb[i][:] = sorted({i, perm[i]})
        P = torch.eye(6, dtype=D)[perm]
        J = chunkjac.compute(f, (x, P), in_dims=(0, None), coupling=nb)
        torch.testing.assert_close(J, blocks(lambda z: f(z, P), x))


def test_a_coupling_array_of_objects_is_an_argument_error():
    with pytest.raises(TypeError, match="chunkjac: coupling is a numpy array of dtype object"):
        chunkjac.compute(torch.sin, torch.randn(4, 2), coupling=np.array([0, 0, 1, 1], dtype=object))


def test_threads_measuring_at_once_give_stderr_back():
    # The memory probe holds fd 2 (a process-wide file) while it measures; threads must not leave it
    # pointing at a deleted temp file.
    r = run_isolated("""
import os, sys, threading, torch, chunkjac
before = os.fstat(2)
def work(k):
    for i in range(3):
        chunkjac.probe_cache.clear()
        chunkjac.compute(lambda x: torch.tanh(x * (k + 1)), torch.randn(16 + k + i, 4, dtype=torch.float64))
ts = [threading.Thread(target=work, args=(k,)) for k in range(4)]
[t.start() for t in ts]; [t.join() for t in ts]
after = os.fstat(2)
assert (before.st_dev, before.st_ino) == (after.st_dev, after.st_ino), "fd 2 was not given back"
print("still here", file=sys.stderr, flush=True)
""")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "still here" in r.stderr


def test_a_recorded_plan_keeps_the_return_outputs_check():
    W = torch.randn(4, 3, dtype=D)
    h = lambda x: (torch.tanh(x @ W), (x ** 2).sum())  # noqa: E731 - the sum does not carry the batch
    x = torch.randn(12, 4, dtype=D)
    p = chunkjac.plan(h, x, output=0, chunk_size=4)
    with pytest.raises(ValueError, match="return_outputs=True, but fn returns a tensor without the batch"):
        chunkjac.compute(h, x, output=0, return_outputs=True, plan=p)


# Writes into the inputs (see [Writes into the inputs] in _writes): batch_norm in training mode given
# running statistics batched like the input wrote C entries through a view of fewer rows, past the end
# of the storage, and the process died in the coupled extraction (SIGSEGV).
BATCH_NORMS = {
    "native_batch_norm": "torch.native_batch_norm(z, w, b, rm, rv, True, 0.5, 0.6)[0]",
    "_native_batch_norm_legit": "torch._native_batch_norm_legit(z, w, b, rm, rv, True, 0.5, 0.6)[0]",
    "_batch_norm_with_update": "torch.ops.aten._batch_norm_with_update(z, w, b, rm, rv, 0.5, 0.6)[0]",
}


@pytest.mark.parametrize("op", BATCH_NORMS)
def test_batched_running_statistics_are_refused_before_any_write(op):
    r = run_isolated(f"""
import torch, chunkjac
torch.manual_seed(0)
x = torch.randn(5, 5, 5, dtype=torch.float64)
w, b, rm, rv = (torch.randn(5, dtype=torch.float64) for _ in range(4)); rv = rv.abs()
before = (rm.clone(), rv.clone())
fn = lambda z, w, b, rm, rv: {BATCH_NORMS[op]}
try:
    chunkjac.compute(fn, (x, w, b, rm, rv), in_dims=(0, 0, 0, 0, 0))
except ValueError as e:
    assert str(e).startswith("chunkjac: fn writes in place into input 3, a batched input"), e
    assert "in_dims=None" in str(e)
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])  # the user's tensors untouched
    print("refused")
""")
    assert r.returncode == 0 and r.stdout.strip() == "refused", r.stderr[-2000:]


def test_shared_running_statistics_are_written_by_fn_and_put_back_after_the_call():
    torch.manual_seed(0)
    x = torch.randn(40, 5, 3, dtype=D)
    rm, rv = torch.zeros(5, dtype=D), torch.ones(5, dtype=D)
    fn = lambda z, rm, rv: torch.nn.functional.batch_norm(z, rm, rv, training=True, momentum=0.5)  # noqa: E731
    J = chunkjac.compute(fn, (x, rm, rv), in_dims=(0, None, None), coupling="coupled")
    torch.testing.assert_close(J, blocks(lambda z: fn(z, rm.clone(), rv.clone()), x))
    assert torch.equal(rm, torch.zeros(5, dtype=D)) and torch.equal(rv, torch.ones(5, dtype=D))


def test_an_in_place_write_into_a_batched_input_is_refused_before_it_happens():
    x = torch.randn(30, 3, dtype=D)
    keep = x.clone()

    def fn(z, t):
        with torch.no_grad():
            t.mul_(2)  # writes the user's second input
        return z * t

    with pytest.raises(ValueError, match=r"fn writes in place into input 1, a batched input \(mul_ writes"):
        chunkjac.compute(fn, (x, x.clone()))
    assert torch.equal(x, keep)


def test_a_shared_input_fn_writes_in_place_is_put_back_and_not_refused():
    x, c = torch.randn(20, 3, dtype=D), torch.ones(3, dtype=D)

    def fn(z, c):
        with torch.no_grad():
            c.add_(1.0)  # a counter fn keeps in a shared tensor
        return z * 2

    J = chunkjac.compute(fn, (x, c), in_dims=(0, None))
    torch.testing.assert_close(J, 2 * torch.eye(3, dtype=D).expand(20, 3, 3))
    assert torch.equal(c, torch.ones(3, dtype=D))
