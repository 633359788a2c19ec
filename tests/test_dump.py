"""Issue 5: out= (tensors, resumable .npy dumps), inputs read chunk by chunk, the dump/plan commands,
and the kill-and-resume acceptance test in a subprocess."""
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import chunkjac
from chunkjac import _dump, _manifest
from chunkjac._cli import main
from chunkjac._sinks import NpySink


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2))


@pytest.fixture
def x():
    return torch.randn(2000, 3)


CLOSE = dict(rtol=1e-5, atol=1e-6)  # float32 in other chunk sizes: another summation order


def reference(f, x):
    """Independent of chunkjac: torch.func's per-sample Jacobians."""
    return torch.func.vmap(torch.func.jacrev(f))(x).detach()


# out= a tensor -------------------------------------------------------------------------------------

def test_out_tensor_is_filled_and_returned(x):
    f = mlp()
    out = torch.full((2000, 2, 3), float("nan"))
    r = chunkjac.compute(f, x, out=out, chunk_size=300)
    assert r is out
    torch.testing.assert_close(out, reference(f, x), **CLOSE)


def test_out_tuple_for_a_tuple_wrt(x):
    f = lambda a, b: torch.sin(a) * b  # noqa: E731
    b = torch.randn(2000, 3)
    outs = (torch.empty(2000, 3, 3), torch.empty(2000, 3, 3))
    r = chunkjac.compute(f, (x, b), wrt=(0, 1), out=outs, chunk_size=700)
    assert r[0] is outs[0] and r[1] is outs[1]
    ref = torch.func.vmap(torch.func.jacrev(f, argnums=(0, 1)))(x, b)
    torch.testing.assert_close(outs[0], ref[0], **CLOSE)
    torch.testing.assert_close(outs[1], ref[1], **CLOSE)


@pytest.mark.parametrize("out, kw, match", [
    (torch.empty(2000, 3, 2), {}, r"torch.empty\(\(2000, 2, 3\), dtype=torch.float32\)"),
    (torch.empty(2000, 2, 3, dtype=torch.float64), {}, "float32 of shape"),
    (torch.empty(2000, 2, 3, requires_grad=True), {}, "requires grad"),
    (torch.empty(2000, 2, 3), {"create_graph": True}, "cannot hold Jacobians on the autograd graph"),
    ([1, 2], {}, "out must be None, a path .*; got list"),
    ("jac.txt", {}, "not to a .npy file"),
])
def test_bad_out(x, out, kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        chunkjac.compute(mlp(), x, out=out, **kw)


def test_result_too_large_for_memory_is_refused_with_advice(x, monkeypatch):
    monkeypatch.setattr(_dump, "free_bytes", lambda device: 10_000)
    with pytest.raises(chunkjac.BudgetError, match=r"out='jacobians.npy'"):
        chunkjac.compute(mlp(), x)


# out= a .npy file -----------------------------------------------------------------------------------

def test_npy_dump_matches_memory_and_is_readable(tmp_path, x):
    f, path = mlp(), str(tmp_path / "jac.npy")
    j = chunkjac.compute(f, x, out=path, chunk_size=300)
    ref = reference(f, x)
    torch.testing.assert_close(j, ref, rtol=0, atol=0)
    np.testing.assert_allclose(np.load(path, mmap_mode="r"), ref.numpy(), rtol=1e-5, atol=1e-6)
    m = json.load(open(path + ".chunkjac.json"))
    assert m["complete"] and len(m["done"]) == len(m["chunks"]) == 7
    assert m["chunks"][0] == [0, 300] and m["chunks"][-1] == [1800, 2000]


def test_complete_dump_is_a_no_op(tmp_path, x, caplog):
    f, path = mlp(), str(tmp_path / "jac.npy")
    chunkjac.compute(f, x, out=path, chunk_size=500)
    before = os.stat(path).st_mtime_ns
    with caplog.at_level("INFO", logger="chunkjac"):
        j = chunkjac.compute(f, x, out=path, chunk_size=500)
    assert "is complete (4 of 4 chunks); nothing to do" in caplog.text
    assert os.stat(path).st_mtime_ns == before
    torch.testing.assert_close(j, reference(f, x), **CLOSE)


class _Crash(Exception):
    pass


def test_resume_after_a_crash_skips_done_chunks_and_equals_an_uninterrupted_run(tmp_path, x, monkeypatch, caplog):
    monkeypatch.setattr(NpySink, "COMMIT_SECONDS", 0.0)  # list every chunk as soon as it is on disk
    f = mlp()
    state = {"crash": True, "starts": set()}

    def h(v):
        if v.shape[0] == 200:  # a chunk: note where it starts
            start = int(torch.nonzero((x == v[0]).all(1))[0])
            state["starts"].add(start)
            if state["crash"] and start == 800:
                raise _Crash
        return f(v)
    path = str(tmp_path / "jac.npy")
    with pytest.raises(_Crash):
        chunkjac.compute(h, x, out=path, chunk_size=200, coupling="independent", mode="reverse")
    m = _manifest.load(path)
    assert sorted(m["done"]) == [0, 1, 2, 3] and not m["complete"]
    state.update(crash=False, starts=set())
    with caplog.at_level("INFO", logger="chunkjac"):
        j = chunkjac.compute(h, x, out=path, chunk_size=200, coupling="independent", mode="reverse")
    assert f"resuming {path}: 4 of 10 chunks already done" in caplog.text
    assert state["starts"] - {0} == {800, 1000, 1200, 1400, 1600, 1800}  # (0: the planner's probe)
    uninterrupted = chunkjac.compute(f, x, out=str(tmp_path / "ref.npy"), chunk_size=200, coupling="independent",
                                     mode="reverse")
    torch.testing.assert_close(j, uninterrupted, rtol=0, atol=0)
    assert _manifest.load(path)["complete"]


@pytest.mark.parametrize("change", ["inputs", "model", "wrt"])
def test_a_different_call_is_refused_and_nothing_is_overwritten(tmp_path, x, change):
    f, path = mlp(), str(tmp_path / "jac.npy")
    chunkjac.compute(f, x, out=path, chunk_size=500)
    data, manifest = open(path, "rb").read(), open(path + ".chunkjac.json").read()
    g, y, kw = f, x, {}
    if change == "inputs":
        y = x.clone()
        y[1234, 0] += 1
    elif change == "model":
        g = mlp()
        with torch.no_grad():
            g[0].bias[0] += 1e-3
    else:
        kw = {"wrt": "0.bias", "out": str(tmp_path / "other.npy")}
    if change == "wrt":  # another wrt is another result: refused at the same path
        with pytest.raises(ValueError, match="differs in: result, wrt"):
            chunkjac.compute(f, x, wrt="0.bias", out=path, chunk_size=500)
    else:
        with pytest.raises(ValueError, match=f"its manifest differs in: .*{change if change != 'model' else 'state'}"):
            chunkjac.compute(g, y, out=path, chunk_size=500, **kw)
    assert open(path, "rb").read() == data and open(path + ".chunkjac.json").read() == manifest


def test_resume_false_starts_over(tmp_path, x):
    f, path = mlp(), str(tmp_path / "jac.npy")
    chunkjac.compute(f, x, out=path, chunk_size=500)
    arr = np.load(path, mmap_mode="r+")
    arr[:] = 0
    arr.flush()
    j = chunkjac.compute(f, x, out=path, chunk_size=500, resume=False)
    torch.testing.assert_close(j, reference(f, x), **CLOSE)


def test_a_file_not_written_by_chunkjac_is_not_overwritten(tmp_path, x):
    path = tmp_path / "jac.npy"
    np.save(path, np.zeros(3))
    with pytest.raises(FileExistsError, match="has no chunkjac manifest"):
        chunkjac.compute(mlp(), x, out=str(path))
    np.testing.assert_array_equal(np.load(path), np.zeros(3))


def test_corrupt_manifest_is_refused(tmp_path, x):
    f, path = mlp(), str(tmp_path / "jac.npy")
    chunkjac.compute(f, x, out=path, chunk_size=500)
    data = open(path, "rb").read()
    with open(path + ".chunkjac.json", "w") as fh:
        fh.write('{"format": "chunkjac-manifest/1", "chunks": [[0, 5')
    with pytest.raises(ValueError, match="corrupt or not chunkjac's.*Delete both files"):
        chunkjac.compute(f, x, out=path, chunk_size=500)
    assert open(path, "rb").read() == data


def test_missing_or_unwritable_directory(tmp_path, x, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        chunkjac.compute(mlp(), x, out=str(tmp_path / "nope" / "jac.npy"))
    (tmp_path / "file").write_text("")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        chunkjac.compute(mlp(), x, out=str(tmp_path / "file" / "jac.npy"))
    monkeypatch.setattr(os, "access", lambda p, mode: False)  # tests run as root: permissions are not enforced
    with pytest.raises(PermissionError, match="is not writable"):
        chunkjac.compute(mlp(), x, out=str(tmp_path / "jac.npy"))
    assert not (tmp_path / "jac.npy").exists()


def test_full_disk_before_starting(tmp_path, x, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(OSError, match=r"would take 48 kB, but .* has 1 kB free"):
        chunkjac.compute(mlp(), x, out=str(tmp_path / "jac.npy"))
    assert os.listdir(tmp_path) == []  # a refused dump leaves nothing behind, its lock file included


def test_full_disk_while_writing_the_manifest_claims_nothing_undone(tmp_path, x, monkeypatch):
    monkeypatch.setattr(NpySink, "COMMIT_SECONDS", 0.0)
    real, saves = _manifest.save, [0]

    def save(path, m):
        saves[0] += 1
        if saves[0] > 3:  # the first save creates the manifest; then two chunks land
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, m)
    monkeypatch.setattr(_manifest, "save", save)
    path = str(tmp_path / "jac.npy")
    with pytest.raises(OSError, match="cannot update the manifest.*No space left.*resumes from there"):
        chunkjac.compute(mlp(), x, out=path, chunk_size=200)
    m = _manifest.load(path)
    assert sorted(m["done"]) == [0, 1] and not m["complete"]
    monkeypatch.setattr(_manifest, "save", real)
    j = chunkjac.compute(mlp(), x, out=path, chunk_size=200)
    torch.testing.assert_close(j, reference(mlp(), x), **CLOSE)


def test_a_second_writer_is_refused(tmp_path, x):
    import fcntl
    path = str(tmp_path / "jac.npy")
    with open(path + ".chunkjac.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(BlockingIOError, match="another process is writing"):
            chunkjac.compute(mlp(), x, out=path)


def test_bfloat16_cannot_go_to_npy(tmp_path, x):
    with pytest.raises(TypeError, match="bfloat16, which .npy files cannot hold"):
        chunkjac.compute(lambda v: torch.sin(v).bfloat16(), x, out=str(tmp_path / "j.npy"))


def test_npy_needs_one_wrt_and_no_outputs(tmp_path, x):
    with pytest.raises(ValueError, match="holds one result"):
        chunkjac.compute(lambda a, b: a * b, (x, x), wrt=(0, 1), out=str(tmp_path / "j.npy"))
    with pytest.raises(ValueError, match="outputs are not stored in the file"):
        chunkjac.compute(mlp(), x, return_outputs=True, out=str(tmp_path / "j.npy"))


def test_coupled_groups_dump_and_resume_keep_whole_groups(tmp_path, monkeypatch):
    monkeypatch.setattr(NpySink, "COMMIT_SECONDS", 0.0)
    x = torch.randn(120, 2, dtype=torch.float64)
    ids = torch.arange(120) // 8

    def f(v):
        z = v.reshape(-1, 8, 2)
        return (torch.softmax(z @ z.transpose(1, 2), -1) @ z).reshape(v.shape)
    path = str(tmp_path / "j.npy")
    j = chunkjac.compute(f, x, coupling=ids, out=path, chunk_size=20)
    m = _manifest.load(path)
    assert all(a % 8 == 0 for a, _ in m["chunks"])
    torch.testing.assert_close(j, chunkjac.compute(f, x, coupling=ids), rtol=0, atol=0)


# Inputs read chunk by chunk ---------------------------------------------------------------------------

def test_memmap_and_read_only_inputs(tmp_path, x):
    np.save(tmp_path / "x.npy", x.numpy())
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    f = mlp()
    torch.testing.assert_close(chunkjac.compute(f, mm, chunk_size=300), reference(f, x), **CLOSE)
    ro = x.numpy().copy()
    ro.flags.writeable = False

    def inplace(a, b):  # fn writes to an input: a read-only source gives it a copy
        b.add_(1.0)
        return f(a)
    j = chunkjac.compute(inplace, (x, ro), coupling="independent", mode="reverse", chunk_size=300)
    torch.testing.assert_close(j, reference(f, x), **CLOSE)
    np.testing.assert_array_equal(ro, x.numpy())
    cols = np.load(tmp_path / "x.npy", mmap_mode="r").T  # the batch in dim 1
    torch.testing.assert_close(chunkjac.compute(lambda v: f(v.T), cols, in_dims=1, chunk_size=300),
                               reference(f, x), **CLOSE)


class Pairs(Dataset):
    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i].numpy(), 0.5  # an array and a number


def test_dataset_inputs(x):
    f = mlp()
    torch.testing.assert_close(chunkjac.compute(f, TensorDataset(x), chunk_size=300), reference(f, x), **CLOSE)
    j = chunkjac.compute(lambda a, s: f(a) * s[:, None], Pairs(x), chunk_size=300)
    torch.testing.assert_close(j, 0.5 * reference(f, x), **CLOSE)


def test_bad_datasets():
    class Ragged(Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return torch.zeros(3 if i < 5 else 4)
    with pytest.raises(ValueError, match="disagree in shape"):
        chunkjac.compute(torch.sin, Ragged(), chunk_size=10)
    with pytest.raises(ValueError, match="empty Dataset"):
        chunkjac.compute(torch.sin, TensorDataset(torch.zeros(0, 3)))


# The command line -------------------------------------------------------------------------------------

FACTORY = """
import time
import torch
from torch import nn

def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3))

class Slow(nn.Module):  # sleeps in each chunk's forward, so that a kill lands mid-dump
    def __init__(self):
        super().__init__()
        self.net = make()

    def forward(self, x):
        if x.shape[0] == 500:
            time.sleep(0.1)
        return self.net(x)

def slow():
    return Slow()

def broken():
    raise RuntimeError("no weights here")
"""


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "model.py").write_text(textwrap.dedent(FACTORY))
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((20_000, 3)).astype(np.float32))
    return tmp_path


def test_cli_dump_then_plan(workdir, capsys):
    out = str(workdir / "jac.npy")
    assert main(["dump", f"{workdir}/model.py:make", str(workdir / "x.npy"), out, "--chunk-size", "5000",
                 "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "plan: 20,000 samples in 4 chunks of 5,000" in text and "wrote:" in text and "peak memory:" in text
    x = torch.from_numpy(np.load(workdir / "x.npy"))
    sys.path.insert(0, str(workdir))
    try:
        import model
        ref = reference(model.make(), x)
    finally:
        sys.path.remove(str(workdir))
    np.testing.assert_allclose(np.load(out), ref.numpy(), rtol=1e-5, atol=1e-6)
    assert main(["dump", f"{workdir}/model.py:make", str(workdir / "x.npy"), out, "--chunk-size", "5000",
                 "--quiet"]) == 0
    assert "is complete (4 of 4 chunks); nothing to do" in capsys.readouterr().err
    assert main(["plan", f"{workdir}/model.py:make", str(workdir / "x.npy"), "--budget", "1MB"]) == 0
    assert capsys.readouterr().out.startswith("plan: 20,000 samples in ")


def test_cli_dumps_per_sample_parameter_jacobians(workdir, capsys):
    out = str(workdir / "params")
    assert main(["dump", f"{workdir}/model.py:make", str(workdir / "x.npy"), out, "--wrt", "params",
                 "--chunk-size", "5000", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "per-sample reverse mode" in text and "one .npy per parameter" in text
    x = torch.from_numpy(np.load(workdir / "x.npy"))[:300]
    sys.path.insert(0, str(workdir))
    try:
        import model
        net = model.make()
        params = {k: v.detach() for k, v in net.named_parameters()}
        ref = torch.func.vmap(torch.func.jacrev(lambda p, z: torch.func.functional_call(net, p, (z[None],))[0]),
                              in_dims=(None, 0))(params, x)
    finally:
        sys.path.remove(str(workdir))
    for k, v in ref.items():
        np.testing.assert_allclose(np.load(f"{out}/{k}.npy", mmap_mode="r")[:300], v.numpy(), rtol=1e-5, atol=1e-6)
    assert main(["dump", f"{workdir}/model.py:make", str(workdir / "x.npy"), out + ".npy", "--wrt", "params"]) == 2


def test_cli_dumps_a_laplacian(workdir, capsys):
    out = str(workdir / "lap.npy")
    assert main(["dump", f"{workdir}/model.py:make", str(workdir / "x.npy"), out, "--part", "laplacian",
                 "--chunk-size", "5000", "--quiet"]) == 0
    assert "laplacian: Taylor mode" in capsys.readouterr().out
    x = torch.from_numpy(np.load(workdir / "x.npy"))
    sys.path.insert(0, str(workdir))
    try:
        import model
        net = model.make()
        h = torch.func.vmap(torch.func.hessian(net))(x)  # (B, out, in, in)
        ref = h.diagonal(dim1=-2, dim2=-1).sum(-1).detach()
    finally:
        sys.path.remove(str(workdir))
    assert np.load(out).shape == tuple(ref.shape)
    np.testing.assert_allclose(np.load(out), ref.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("argv, match", [
    (["dump", "{w}/missing.py:make", "{w}/x.npy", "{w}/j.npy"], "does not exist"),
    (["dump", "{w}/model.py:nothing", "{w}/x.npy", "{w}/j.npy"], "has no callable named 'nothing'"),
    (["dump", "{w}/model.py:broken", "{w}/x.npy", "{w}/j.npy"], "broken\\(\\) raised RuntimeError: no weights here"),
    (["dump", "no_such_package.mod:make", "{w}/x.npy", "{w}/j.npy"], "cannot import no_such_package.mod"),
    (["dump", "model.py", "{w}/x.npy", "{w}/j.npy"], "FACTORY must be"),
    (["dump", "{w}/model.py:make", "{w}/y.npy", "{w}/j.npy"], "input file .*y.npy does not exist"),
    (["dump", "{w}/model.py:make", "{w}/x.npy", "{w}/j.txt"], "OUT .* must be a path ending in .npy"),
    (["dump", "{w}/model.py:make", "{w}/x.npy", "{w}/j.npy", "--budget", "lots"], "budget"),
    (["plan", "{w}/model.py:make", "{w}/x.npy", "--wrt", "7"], "wrt=7 is out of range"),
])
def test_cli_user_mistakes_exit_2_without_traceback(workdir, capsys, argv, match):
    argv = [a.format(w=workdir) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert __import__("re").search(match, err), err


def test_cli_refuses_a_mismatching_resume(workdir, capsys):
    out = str(workdir / "jac.npy")
    assert main(["dump", f"{workdir}/model.py:make", str(workdir / "x.npy"), out, "--quiet"]) == 0
    np.save(workdir / "x2.npy", np.load(workdir / "x.npy") * 2)
    data = open(out, "rb").read()
    assert main(["dump", f"{workdir}/model.py:make", str(workdir / "x2.npy"), out, "--quiet"]) == 2
    assert "different call" in capsys.readouterr().err
    assert open(out, "rb").read() == data


def test_kill_and_resume_in_a_subprocess(workdir):
    """SIGKILL a dump in the middle, run the same command again: the file equals an uninterrupted one."""
    out = workdir / "jac.npy"
    cmd = [sys.executable, "-m", "chunkjac", "dump", f"{workdir}/model.py:slow", str(workdir / "x.npy"), str(out),
           "--chunk-size", "500", "--quiet", "--deterministic"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    manifest = str(out) + ".chunkjac.json"
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            done = len(json.load(open(manifest))["done"])
        except (OSError, ValueError):
            done = 0
        if done >= 10:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    m = _manifest.load(str(out))
    assert 10 <= len(m["done"]) < 40 and not m["complete"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"resuming {out}: {len(m['done'])} of 40 chunks already done" in r.stderr
    assert _manifest.load(str(out))["complete"]
    ref = workdir / "ref.npy"
    r = subprocess.run(cmd[:6] + [str(ref)] + cmd[7:], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    a, b = np.load(out), np.load(ref)
    np.testing.assert_array_equal(a, b)
    assert (np.abs(a).reshape(len(a), -1).sum(1) > 0).all()  # every sample's block was written


# Found in review --------------------------------------------------------------------------------------

def test_a_model_with_batchnorm_dumps_and_resumes(tmp_path, x):
    """0-d buffers (num_batches_tracked) are part of the fingerprint too."""
    f = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).eval()
    path = str(tmp_path / "bn.npy")
    j = chunkjac.compute(f, x, out=path, chunk_size=500)
    torch.testing.assert_close(j, chunkjac.compute(f, x), **CLOSE)
    chunkjac.compute(f, x, out=path, chunk_size=500)


def test_a_model_changed_behind_a_closure_is_refused(tmp_path, x):
    model = mlp()
    f = lambda v: model(v).double()  # noqa: E731 - the model is reached through a closure
    path = str(tmp_path / "jac.npy")
    chunkjac.compute(f, x, out=path, chunk_size=500)
    with torch.no_grad():
        model[0].weight[0, 0] += 1e-3
    with pytest.raises(ValueError, match="differs in: state"):
        chunkjac.compute(f, x, out=path, chunk_size=500)


def test_a_failed_dump_releases_its_lock_in_the_same_process(tmp_path, x):
    path = str(tmp_path / "jac.npy")
    calls = [0]

    def f(v):
        calls[0] += 1
        if v.shape[0] == 500 and calls[0] > 3:
            raise KeyboardInterrupt
        return torch.sin(v)
    with pytest.raises(KeyboardInterrupt) as info:
        chunkjac.compute(f, x, out=path, chunk_size=500, coupling="independent", mode="reverse")
    calls[0] = -10**9
    j = chunkjac.compute(f, x, out=path, chunk_size=500, coupling="independent", mode="reverse")  # not "another process"
    torch.testing.assert_close(j, chunkjac.compute(torch.sin, x), **CLOSE)
    del info


@pytest.mark.parametrize("damage", ["no chunks", "no plan", "truncated npy"])
def test_damaged_manifest_or_file_is_refused(tmp_path, x, damage):
    f, path = mlp(), str(tmp_path / "jac.npy")
    chunkjac.compute(f, x, out=path, chunk_size=500)
    mp = path + ".chunkjac.json"
    m = json.load(open(mp))
    if damage == "no chunks":
        m["chunks"], m["done"] = [], []
    elif damage == "no plan":
        del m["plan"]["modes"]
    m["complete"] = False
    json.dump(m, open(mp, "w"))
    if damage == "truncated npy":
        with open(path, "r+b") as fh:
            fh.truncate(20)
    with pytest.raises(ValueError, match="(?i)delete both files"):
        chunkjac.compute(f, x, out=path, chunk_size=500)


def test_cli_fn_failing_on_the_inputs_and_a_missing_gpu_exit_2(workdir, capsys):
    np.save(workdir / "x4.npy", np.zeros((100, 4), dtype=np.float32))
    assert main(["dump", f"{workdir}/model.py:make", str(workdir / "x4.npy"), str(workdir / "j.npy")]) == 2
    err = capsys.readouterr().err
    assert "fn raised RuntimeError" in err and "mat1 and mat2 shapes cannot be multiplied" in err
    assert "Traceback" not in err
    if not torch.cuda.is_available():
        assert main(["plan", f"{workdir}/model.py:make", str(workdir / "x.npy"), "--device", "cuda"]) == 2
        assert "sees no CUDA device" in capsys.readouterr().err


# The command line says what happened (issue 25, section 3) -----------------------------------------

def test_cli_a_negative_budget_reaches_the_budgets_own_message(workdir, capsys):
    assert main(["plan", f"{workdir}/model.py:make", str(workdir / "x.npy"), "--budget", "-3GB"]) == 2
    assert "budget='-3GB' is not a memory size" in capsys.readouterr().err


def test_cli_sizes_and_memory_are_in_the_units_they_have(workdir, capsys):
    np.save(workdir / "small.npy", np.zeros((100, 3), dtype=np.float32))
    out = workdir / "small_jac.npy"
    assert main(["dump", f"{workdir}/model.py:make", str(workdir / "small.npy"), str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "writing 3.6 kB to" in text  # 100 x 3 x 3 float32 (it said "0.00 GB")
    mapped = re.search(r"up to ([\d.]+) (\w?B) of mapped file pages added by the dump", text)
    assert mapped and float(mapped.group(1)) * {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}[mapped.group(2)] < 50e6
    assert sorted(os.listdir(workdir)) == ["model.py", "small.npy", "small_jac.npy", "small_jac.npy.chunkjac.json",
                                           "x.npy"]  # no lock file left behind


def test_cli_a_missing_output_folder_is_said_before_the_model_is_built(workdir, capsys):
    (workdir / "model.py").write_text("raise SystemExit('the factory ran')\n")
    assert main(["dump", f"{workdir}/model.py:make", str(workdir / "x.npy"), str(workdir / "no" / "j.npy")]) == 2
    assert "the directory" in capsys.readouterr().err


def test_cli_a_float64_npy_gets_the_numpy_cast(workdir, capsys):
    np.save(workdir / "x64.npy", np.zeros((100, 3)))
    assert main(["dump", f"{workdir}/model.py:make", str(workdir / "x64.npy"), str(workdir / "j.npy")]) == 2
    assert "astype(np.float32)" in capsys.readouterr().err


def test_ctrl_c_during_a_dump_says_what_is_saved_and_how_to_go_on(workdir):
    code = textwrap.dedent(f"""
        import os, signal, threading, sys
        sys.path.insert(0, {str(workdir)!r})
        import numpy as np, torch, chunkjac, model
        from chunkjac import _sinks
        _sinks.NpySink.COMMIT_SECONDS = 0.0
        net, calls, armed = model.make(), [], []
        def fn(z):
            calls.append(1)
            if armed and len(calls) == 8:  # the run's eighth chunk (counted once the plan is made)
                os.kill(os.getpid(), signal.SIGINT)
            return net(z)
        x = np.load({str(workdir / 'x.npy')!r}, mmap_mode="r")
        out = {str(workdir / 'cc.npy')!r}
        p = chunkjac.plan(fn, x, out=out, chunk_size=1000)
        calls.clear()
        armed.append(True)
        chunkjac.compute(fn, x, out=out, plan=p)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert re.search(r"KeyboardInterrupt: chunkjac: interrupted: \d+ of 20 chunks are saved in .*cc.npy; run the "
                     r"same call again to resume", r.stderr), r.stderr[-2000:]
    assert "_executor" not in r.stderr and "_sinks" not in r.stderr  # one short traceback, not thirty lines
