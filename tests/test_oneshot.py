"""One-shot jobs (issue 26): planning from the cost model, candidates timed on the run's first chunks,
the plan cache on disk, dumps that are complete returning at once. Every answer is checked against an
independent reference; the cache and the trials may only change the time a call takes."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import jacrev, vmap

import chunkjac
from chunkjac import _executor, _manifest, _planner
from chunkjac._plancache import FORMAT

def r(*shape):
    return torch.randn(*shape, dtype=torch.float64)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CHUNKJAC_CACHE_DIR", str(tmp_path / "cache"))
    chunkjac.probe_cache.clear()
    yield
    chunkjac.probe_cache.clear()


def pinn(width=32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                         nn.Linear(width, 3)).double().requires_grad_(False)


def reference(f, x):
    return vmap(jacrev(f))(x)


def entries() -> list:
    d = chunkjac.plan_cache.path
    return sorted(os.path.join(d, n) for n in os.listdir(d) if n.endswith(".json")) if os.path.isdir(d) else []


# The plan cache --------------------------------------------------------------------------------------

def test_a_run_leaves_its_choice_on_disk_and_the_next_process_plans_nothing(tmp_path):
    f, x = pinn(), r(4000, 3)
    J = chunkjac.compute(f, x, chunk_size=250)
    torch.testing.assert_close(J, reference(f, x))
    (path,) = entries()
    entry = json.load(open(path))
    assert entry["format"] == FORMAT and entry["torch"] == torch.__version__
    assert entry["plan"]["chunk_size"] == 250 and entry["plan"]["strategy"] == "coloured"
    # A second process (the memo empty): the remembered choice, no trials, the same answer.
    chunkjac.probe_cache.clear()
    hits = chunkjac.plan_cache.hits
    p = chunkjac.plan(f, x, chunk_size=250)
    assert chunkjac.plan_cache.hits == hits + 1 and p.trials == ()
    assert (p.modes, p.rows_per_vjp) == (tuple(entry["plan"]["modes"]), entry["plan"]["rows_per_vjp"])
    torch.testing.assert_close(chunkjac.compute(f, x, chunk_size=250), J)


@pytest.mark.parametrize("damage", ["not json", "truncated", "wrong types", "unknown strategy",
                                    "not a candidate", "chunk over the budget", "another torch"])
def test_a_corrupt_or_stale_entry_costs_a_replan_never_an_answer(damage):
    f, x = pinn(), r(3000, 3)
    ref = reference(f, x)
    chunkjac.compute(f, x, budget="64MB")
    (path,) = entries()
    entry = json.load(open(path))
    text = json.dumps(entry)
    if damage == "not json":
        text = "{{{ this is not a plan"
    elif damage == "truncated":
        text = text[: len(text) // 2]
    elif damage == "wrong types":
        entry["plan"]["chunk_size"] = "lots"
        text = json.dumps(entry)
    elif damage == "unknown strategy":
        entry["plan"]["strategy"] = "magic"
        text = json.dumps(entry)
    elif damage == "not a candidate":  # forward mode over 13 rows at a time: no such candidate here
        entry["plan"].update(modes=["forward"], cols_per_jvp=13)
        text = json.dumps(entry)
    elif damage == "chunk over the budget":
        entry["plan"].update(chunk_size=10**9, peak_bytes=10**15)
        text = json.dumps(entry)
    elif damage == "another torch":
        entry["torch"] = "1.0.0"
        text = json.dumps(entry)
    open(path, "w").write(text)
    chunkjac.probe_cache.clear()
    hits = chunkjac.plan_cache.hits
    J = chunkjac.compute(f, x, budget="64MB")
    torch.testing.assert_close(J, ref)
    p = chunkjac.plan(f, x, budget="64MB")
    assert p.chunk_size <= 3000 and p.peak_bytes <= 64e6
    if damage in ("not a candidate", "chunk over the budget"):
        assert chunkjac.plan_cache.hits == hits + 1  # read, and not followed where it cannot be
    else:
        assert chunkjac.plan_cache.hits == hits  # ignored


def test_a_remembered_forward_mode_is_still_cross_checked():
    """An entry that says forward mode for a function whose forward-mode formula is wrong
    (max_unpool2d with repeated indices): the check runs as for a new plan, and reverse mode answers."""
    pool = nn.MaxPool2d(2, stride=1, return_indices=True)
    unpool = nn.MaxUnpool2d(2, stride=1)

    def fn(v):
        z = v.reshape(-1, 1, 3, 3)
        y, i = pool(z)
        return unpool(y, i, output_size=z.shape).reshape(len(v), -1)

    x = r(6, 9)
    ref = torch.stack([torch.autograd.functional.jacobian(lambda z: fn(z[None])[0], x[i]) for i in range(6)])
    torch.testing.assert_close(chunkjac.compute(fn, x, coupling="independent"), ref)
    (path,) = entries()
    entry = json.load(open(path))
    entry["plan"].update(modes=["forward"], rows_per_vjp=9, cols_per_jvp=9)
    json.dump(entry, open(path, "w"))
    chunkjac.probe_cache.clear()
    torch.testing.assert_close(chunkjac.compute(fn, x, coupling="independent"), ref)


def test_look_alike_functions_get_their_own_entries():
    x = r(2000, 3)
    chunkjac.compute(lambda v: v.sin() * 2, x)
    chunkjac.compute(lambda v: v.cos() * 2, x)
    chunkjac.compute(pinn(32), x)
    chunkjac.compute(pinn(16), x)
    assert len(entries()) == 4


def test_off_switch_and_clear(monkeypatch):
    f, x = pinn(), r(1000, 3)
    monkeypatch.setenv("CHUNKJAC_PLAN_CACHE", "0")
    chunkjac.compute(f, x)
    assert entries() == []
    monkeypatch.delenv("CHUNKJAC_PLAN_CACHE")
    chunkjac.plan_cache.enabled = False
    try:
        chunkjac.probe_cache.clear()
        chunkjac.compute(f, x)
        assert entries() == []
    finally:
        chunkjac.plan_cache.enabled = True
    chunkjac.probe_cache.clear()
    chunkjac.compute(f, x)
    assert len(entries()) == 1
    chunkjac.plan_cache.clear()
    assert entries() == []


def test_a_cache_folder_that_cannot_be_written_is_skipped(tmp_path, monkeypatch):
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")
    monkeypatch.setenv("CHUNKJAC_CACHE_DIR", str(blocked))
    f, x = pinn(), r(500, 3)
    torch.testing.assert_close(chunkjac.compute(f, x), reference(f, x))


CHILD = textwrap.dedent('''
    import sys, torch, chunkjac
    from torch import nn
    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(3, 64), nn.Tanh(), nn.Linear(64, 3)).double().requires_grad_(False)
    x = torch.randn(20000, 3, dtype=torch.float64)
    J = chunkjac.compute(f, x, chunk_size=500)
    ref = torch.func.vmap(torch.func.jacrev(f))(x)
    assert torch.allclose(J, ref), (J - ref).abs().max()
    print("ok", chunkjac.plan_cache.hits)
''')


def test_two_processes_planning_at_once_each_leave_a_whole_entry(tmp_path):
    env = {**os.environ, "CHUNKJAC_CACHE_DIR": str(tmp_path / "shared")}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0 and out.startswith("ok"), err
    folder = tmp_path / "shared" / "plans"
    files = [n for n in os.listdir(folder)]
    assert len(files) == 1 and files[0].endswith(".json")  # one entry, no temporary left behind
    entry = json.load(open(folder / files[0]))
    assert entry["plan"]["chunk_size"] == 500
    r = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.split() == ["ok", "1"], r.stderr  # a third process reads it


# Timing on the run's first chunks --------------------------------------------------------------------

def test_a_plan_switched_mid_run_gives_the_answer_of_a_fixed_plan(monkeypatch):
    f, x = pinn(), r(6000, 3)
    p = chunkjac.plan(f, x, chunk_size=300)
    assert p.trials, "equal-cost candidates (rows in one call or one per call) ride along"
    real = _executor._Trials.timed

    def trial_looks_faster(self, q, seconds, n, full):  # the trial's chunks "take" a thousandth
        return real(self, q, seconds if q is self.plan else seconds / 1000, n, full)

    monkeypatch.setattr(_executor._Trials, "timed", trial_looks_faster)
    J = chunkjac.compute(f, x, chunk_size=300)
    key = [v for v in chunkjac.probe_cache._entries.values() if isinstance(v[1], tuple) and len(v[1]) == 5]
    settled = key[0][1][2]
    assert settled.trials == () and (settled.rows_per_vjp, settled.modes) != (p.rows_per_vjp, p.modes)
    fixed = chunkjac.compute(f, x, plan=p)
    torch.testing.assert_close(J, fixed)
    torch.testing.assert_close(J, reference(f, x))
    # The next call runs the settled plan: nothing timed again.
    assert chunkjac.plan(f, x, chunk_size=300).trials == ()


def test_trials_that_are_slower_are_dropped_after_one_chunk():
    t = _executor._Trials
    plan = chunkjac.plan(pinn(), r(6000, 3), chunk_size=300)
    trials = t(plan)
    (other,) = plan.trials
    seq = []
    for seconds in (9.0, 1.0, 2.0, 1.0):  # warm-up, the plan, the trial (slower), the plan
        q = trials.next()
        seq.append(q is plan)
        trials.timed(q, seconds, 300, True)
        if trials.done:
            break
    assert seq == [True, True, False] and trials.done and trials.plan.rows_per_vjp == plan.rows_per_vjp


def test_deterministic_runs_time_nothing_and_give_the_same_bits():
    f, x = pinn().float(), torch.randn(6000, 3)
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            chunkjac.probe_cache.clear()
            p = chunkjac.plan(f, x, chunk_size=300)
            assert p.trials == () and p.seconds is None
            runs.append(chunkjac.compute(f, x, chunk_size=300))
        assert torch.equal(runs[0], runs[1])
        assert entries() == []  # deterministic runs neither read nor write the plan cache
    finally:
        torch.use_deterministic_algorithms(False)


# Work already done is not planned again -----------------------------------------------------------------

def test_a_complete_dump_returns_at_once_without_planning(tmp_path, monkeypatch):
    f, x = pinn(), r(3000, 3)
    out = str(tmp_path / "jac.npy")
    J = chunkjac.compute(f, x, out=out, chunk_size=500)
    chunkjac.probe_cache.clear()

    def no_planning(*a, **k):
        raise AssertionError("planned a complete dump")

    monkeypatch.setattr("chunkjac._call.make_plan", no_planning)
    monkeypatch.setattr("chunkjac._call.check_coupling", no_planning)
    again = chunkjac.compute(f, x, out=out, chunk_size=500)
    np.testing.assert_array_equal(again.numpy(), J.numpy())
    torch.testing.assert_close(again, reference(f, x))
    # Another call is not this dump's: the usual path refuses it, nothing overwritten.
    monkeypatch.undo()
    with pytest.raises(_manifest.ManifestError, match="different call"):
        chunkjac.compute(f, x * 2, out=out, chunk_size=500)


def test_coupled_parameter_jacobians_take_the_whole_batch_vjps():
    """BatchNorm in training couples the samples; per-sample parameter Jacobians of a small CNN: a
    VJP per (sample, output) of one whole-batch forward, not one JVP per parameter element."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).double()
    x = r(6, 1, 8, 8)
    p = chunkjac.plan(net, x, wrt="params")
    assert p.mode == "reverse" and p.colours == 6, str(p)
    J = chunkjac.compute(net, x, wrt="params")
    params = dict(net.named_parameters())
    buffers = dict(net.named_buffers())

    def whole(ps):
        return torch.func.functional_call(net, {**ps, **{k: v.clone() for k, v in buffers.items()}}, (x,))

    full = torch.func.jacrev(whole)(params)  # (6, 5, *shape): the whole batch's Jacobian
    for k, v in J.items():
        torch.testing.assert_close(v, full[k])


def test_estimates_are_never_negative():
    p = chunkjac.plan(lambda v: v.softmax(0), r(64, 3), coupling="coupled")
    assert p.seconds is not None and p.seconds > 0


# A dump killed while its first chunks time candidates ---------------------------------------------------

FACTORY = '''
import time
import torch
from torch import nn

class Slow(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, 64), nn.Tanh(), nn.Linear(64, 3))
    def forward(self, x):
        time.sleep(0.05)
        return self.net(x)

def slow():
    return Slow().requires_grad_(False)
'''


def test_a_dump_killed_while_chunks_are_in_flight_resumes_to_the_same_answer(tmp_path):
    (tmp_path / "model.py").write_text(FACTORY)
    x = np.random.default_rng(0).standard_normal((20_000, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "jac.npy"
    env = {**os.environ, "CHUNKJAC_CACHE_DIR": str(tmp_path / "cache")}
    # Not deterministic: the first chunks time the plan's trials while the writer runs.
    cmd = [sys.executable, "-m", "chunkjac", "dump", f"{tmp_path}/model.py:slow", str(tmp_path / "x.npy"), str(out),
           "--chunk-size", "250", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    manifest = str(out) + ".chunkjac.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if len(json.load(open(manifest))["done"]) >= 3:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    m = _manifest.load(str(out))
    assert 3 <= len(m["done"]) < 80 and not m["complete"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert _manifest.load(str(out))["complete"]
    import importlib.util
    spec = importlib.util.spec_from_file_location("oneshot_factory", tmp_path / "model.py")
    factory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(factory)
    ref = vmap(jacrev(factory.slow().net))(torch.from_numpy(x))
    np.testing.assert_allclose(np.load(out), ref.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_the_planner_runs_no_losing_forward_mode():
    """The count rule: the PINN's forward mode (3 JVPs at twice a VJP's cost) is never run while
    planning reverse mode; sin's vectorised and looped rows ride along as trials instead."""
    f, x = pinn(), r(20_000, 3)
    ran = []
    real = _planner._runs
    _planner._runs = lambda spec, q: ran.append(q.modes) or real(spec, q)
    try:
        p = chunkjac.plan(f, x, chunk_size=500)
    finally:
        _planner._runs = real
    assert p.modes == ("reverse",) and all(m == ("reverse",) for m in ran)
