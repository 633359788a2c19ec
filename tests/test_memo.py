"""Remembered decisions (see [What a remembered decision is keyed on] in chunkjac/_memo.py): the guard
sees what can change fn's behaviour, and look-alike functions never share a decision."""

import pytest
import torch
from torch import nn

import chunkjac
import chunkjac._detect as detect
import chunkjac._memo as memo
from chunkjac._spec import normalize

from _reference import blocks


def spec_of(f, args, **kw):
    opts = dict(wrt=0, output=None, in_dims=0, mode="auto", coupling="auto", create_graph=False,
                return_outputs=False)
    opts.update(kw)
    return normalize(f, args, **opts)


def interacts(found) -> bool:
    return found.derivatives or not found.splittable


# Guards -----------------------------------------------------------------------------------------

def test_guard_survives_an_optimizer_step_and_state_key_does_not():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    x = torch.randn(16, 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    spec = spec_of(model, x)
    s0, k0 = memo.state_key(spec), memo.guard(spec)
    assert memo.state_key(spec) == s0 and memo.guard(spec) == k0  # repeated calls
    model(x).pow(2).sum().backward()
    opt.step()
    spec = spec_of(model, x)
    assert memo.state_key(spec) != s0
    assert memo.guard(spec) == k0
    assert memo.guard(spec_of(model, torch.randn(16, 3))) == k0  # new float inputs, same layout


def test_the_check_leaves_state_key_as_it_was():
    """Buffers the forwards do not write to are not restored (a restoring write would move their
    versions, and the next call would miss the cache)."""
    model = _bn_model()
    model(torch.randn(8, 3))
    spec = spec_of(lambda v: model(v), torch.randn(100, 3))
    key = memo.state_key(spec)
    assert not interacts(detect.check(spec))
    assert memo.state_key(spec) == key


def _bn_model():
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).eval()


def _change_mode(m, x):
    m.train()


def _add_hook(m, x):
    m[0].register_forward_hook(lambda *a: None)


def _add_pre_hook(m, x):
    m.register_forward_pre_hook(lambda *a: None)


def _resize(m, x):
    m[0] = nn.Linear(3, 4, bias=False)


def _to_double(m, x):
    m.double()


CHANGES = {"train_flag": _change_mode, "forward_hook": _add_hook, "forward_pre_hook": _add_pre_hook,
           "parameter_names": _resize, "dtype": _to_double}


@pytest.mark.parametrize("closure", [False, True], ids=["module", "closure"])
@pytest.mark.parametrize("change", CHANGES)
def test_guard_sees_what_can_change_the_verdict(change, closure):
    model = _bn_model()
    x = torch.randn(8, 3)
    fn = (lambda v: model(v)) if closure else model
    k0 = memo.guard(spec_of(fn, x))
    CHANGES[change](model, x)
    assert memo.guard(spec_of(fn, x)) != k0


def test_guard_sees_inputs_code_and_integer_values():
    x, ids = torch.randn(8, 3), torch.arange(8)
    f = lambda v, i: v * i[:, None]  # noqa: E731
    k0 = memo.guard(spec_of(f, (x, ids)))
    assert memo.guard(spec_of(f, (torch.randn(8, 3), ids))) == k0
    assert memo.guard(spec_of(f, (torch.randn(9, 3), torch.arange(9)))) != k0  # shape
    assert memo.guard(spec_of(f, (x.double(), ids))) != k0  # dtype
    assert memo.guard(spec_of(f, (x, torch.arange(8) // 2))) != k0  # integer values: structure
    assert memo.guard(spec_of(f, (x.T, ids), in_dims=(1, 0))) != k0  # in_dims
    g = lambda v, i: v * i[:, None] + v.mean(0)  # noqa: E731
    assert memo.guard(spec_of(g, (x, ids))) != k0  # code

    def outer(helper, dim):
        return lambda v: helper(v, dim)

    same = outer(torch.softmax, -1)
    assert memo.guard(spec_of(same, x)) == memo.guard(spec_of(outer(torch.softmax, -1), x))
    assert memo.guard(spec_of(same, x)) != memo.guard(spec_of(outer(torch.softmax, 0), x))
    assert memo.guard(spec_of(same, x)) != memo.guard(spec_of(outer(torch.cumsum, -1), x))
    assert memo.guard(spec_of(outer(lambda v, d: v * d, 1), x)) != \
        memo.guard(spec_of(outer(lambda v, d: v + d, 1), x))  # the code of a closed-over function
    ids.add_(0)  # an in-place write to an integer input
    assert memo.guard(spec_of(f, (x, ids))) != k0


def test_guard_does_not_take_a_new_tensor_at_a_freed_address_for_the_old():
    f = lambda v, i: v * i[:, None]  # noqa: E731
    x, ids = torch.randn(8, 3), torch.arange(8) % 3
    key = memo.guard(spec_of(f, (x, ids)))
    assert memo.guard(spec_of(f, (x, ids))) == key  # the same live tensor
    assert memo.guard(spec_of(f, (x, ids.clone()))) != key  # another one
    old = memo._Same(ids)
    del ids
    new = memo._Same(torch.arange(8) % 3)
    new.ident = old.ident  # as if the allocator had handed out the freed address again
    assert hash(new) == hash(old) and new != old


# Look-alikes: functions and modules that share what an identity-only key saw --------------------------
# Each calls chunkjac twice in one process, the second time on something that behaves differently but
# looked the same to the old key; the second answer must equal the reference (never the first call's
# decision reused).

D = torch.float64


def _x():
    return torch.randn(6, 4, dtype=D)


def test_keyword_only_defaults_are_in_the_guard():
    x = _x()
    for op in (torch.sin, lambda z: torch.cumsum(z, 0)):
        f = lambda z, *t, op=op: op(z)  # noqa: E731 - op is keyword-only: __kwdefaults__
        J = chunkjac.compute(f, x)
        torch.testing.assert_close(J, blocks(f, x))


def test_a_list_edited_in_place_behind_a_closure_decides_again():
    x = _x()
    ops = [torch.sin]
    f = lambda z: ops[0](z)  # noqa: E731
    chunkjac.compute(f, x)
    ops[0] = lambda z: z * z.sum(0)  # now the samples interact
    with pytest.warns(chunkjac.CouplingWarning):
        J = chunkjac.compute(f, x)
    torch.testing.assert_close(J, blocks(f, x))


class Mixer(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4).double()
        self.mix = False

    def forward(self, z):
        y = torch.tanh(self.lin(z))
        return y + y.mean(0) if self.mix else y


def test_a_plain_module_attribute_that_decides_the_coupling_is_in_the_guard():
    x = _x()
    m = Mixer()
    torch.testing.assert_close(chunkjac.compute(m, x), blocks(m, x))
    m.mix = True
    with pytest.warns(chunkjac.CouplingWarning):
        J = chunkjac.compute(m, x)
    torch.testing.assert_close(J, blocks(m, x))
    m.mix = False  # and back: the first decision again, still exact
    torch.testing.assert_close(chunkjac.compute(m, x), blocks(m, x))


class Settings:
    def __init__(self):
        self.mix = False


def _helper(z, settings):
    return z + z.mean(0) if settings.mix else z


def test_attributes_read_by_a_function_walked_after_the_object_are_in_the_guard():
    # settings is walked before _helper, whose code is what names .mix: the guard walks again.
    x, settings = _x(), Settings()
    f = lambda z: torch.sin(z) * len(vars(settings)) + _helper(z, settings)  # noqa: E731
    chunkjac.compute(f, x)
    settings.mix = True
    with pytest.warns(chunkjac.CouplingWarning):
        J = chunkjac.compute(f, x)
    torch.testing.assert_close(J, blocks(f, x))


def test_a_trainer_method_sees_its_objects_attributes():
    class Trainer:
        def __init__(self):
            self.model = Mixer()
            self.scale = 1.0

        def step(self, z):
            return self.model(z) * self.scale

    t, x = Trainer(), _x()
    chunkjac.compute(t.step, x)
    t.model.mix = True
    with pytest.warns(chunkjac.CouplingWarning):
        J = chunkjac.compute(t.step, x)
    torch.testing.assert_close(J, blocks(t.step, x))


def test_a_user_module_global_is_in_the_guard(tmp_path, monkeypatch):
    (tmp_path / "lookalike_config.py").write_text("MIX = False\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import lookalike_config as cfg
    ns = {"cfg": cfg, "torch": torch}
    exec("def f(z):\n    return z + z.mean(0) if cfg.MIX else torch.sin(z)\n", ns)
    f, x = ns["f"], _x()
    chunkjac.compute(f, x)
    cfg.MIX = True
    with pytest.warns(chunkjac.CouplingWarning):
        J = chunkjac.compute(f, x)
    torch.testing.assert_close(J, blocks(f, x))


def test_what_the_guard_cannot_see_has_a_switch():
    # getattr with a computed name is outside the key (the NOTE says so): probe_cache.enabled = False
    # decides at every call.
    x, m = _x(), Mixer()
    name = "m" + "ix"
    f = lambda z: m.lin(z) + m.lin(z).mean(0) * getattr(m, name)  # noqa: E731
    chunkjac.compute(f, x)
    m.mix = True
    chunkjac.probe_cache.enabled = False
    try:
        with pytest.warns(chunkjac.CouplingWarning):
            J = chunkjac.compute(f, x)
    finally:
        chunkjac.probe_cache.enabled = True
    torch.testing.assert_close(J, blocks(f, x))


def test_fn_too_large_to_guard_is_decided_at_every_call(monkeypatch):
    monkeypatch.setattr(memo, "WALK_ITEMS", 1)
    memo._warned.clear()
    x, m = _x(), Mixer()
    with pytest.warns(RuntimeWarning, match="decides its coupling and plan anew"):
        chunkjac.compute(m, x)
    m.mix = True
    with pytest.warns(chunkjac.CouplingWarning):
        torch.testing.assert_close(chunkjac.compute(m, x), blocks(m, x))


def test_an_optimizer_step_keeps_the_guard():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    f = lambda z: model(z)  # noqa: E731
    x = torch.randn(16, 3)
    k0 = memo.guard(spec_of(f, x))
    model(x).pow(2).sum().backward()
    opt.step()
    assert memo.guard(spec_of(f, x)) == k0
