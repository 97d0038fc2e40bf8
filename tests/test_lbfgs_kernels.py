"""The L-BFGS direction, as the C kernel and as tensor operations, is torch.optim.LBFGS's two-loop recursion;
without the kernels the engine runs the tensor round."""

from __future__ import annotations

import shutil

import pytest
import torch

from attacks import lbfgs, lbfgs_kernels, native
from attacks.lbfgs import BatchedLBFGS, LBFGSSettings, _direction, _History


def _two_loop(stps: list, dirs: list, h_diag: float, g: torch.Tensor) -> torch.Tensor:
    """torch.optim.LBFGS.step's direction, written as it is there (oldest pair first)."""
    ro = [1.0 / float(y.dot(s)) for y, s in zip(dirs, stps)]
    q, al = g.neg(), [0.0] * len(dirs)
    for i in range(len(dirs) - 1, -1, -1):
        al[i] = float(stps[i].dot(q)) * ro[i]
        q = q - al[i] * dirs[i]
    r = q * h_diag
    for i in range(len(dirs)):
        be_i = float(dirs[i].dot(r)) * ro[i]
        r = r + (al[i] - be_i) * stps[i]
    return r


def _rounds(n: int, H: int, D: int, rounds: int, dtype: torch.dtype, seed: int = 0):
    """Random rounds as the engine produces them: per lane (g, s, y, dots_new, push, need, h_diag), pairs
    with positive curvature, lanes that skip pushes, lanes whose direction is not needed (a stopped
    lane, the end of a step), and lane 1 restarting (history cleared) midway."""
    gen = torch.Generator().manual_seed(seed)
    h_diag = torch.ones(n, dtype=dtype)
    for k in range(rounds):
        g, s, noise = (torch.randn(n, D, generator=gen, dtype=dtype) for _ in range(3))
        y = s * torch.rand(n, 1, generator=gen, dtype=dtype).add(0.5) + 0.3 * noise
        ys, yy = (y * s).sum(1), (y * y).sum(1)
        push = (torch.rand(n, generator=gen) < 0.8) & (ys > 1e-10)
        push[0] = True  # lane 0 fills and evicts as fast as possible
        if k < 3:
            push[2] = False  # lane 2 starts with an empty history
        need = push | (torch.rand(n, generator=gen) < 0.7)
        if k % 3 == 1:
            push[-1] = need[-1] = False  # the last lane sits out every third round
        h_diag = torch.where(push, ys / yy, h_diag)
        dots_new = torch.stack([ys, yy, (s * g).sum(1), (y * g).sum(1)], 1)
        yield k, g, s, y, dots_new, push, need, h_diag.clone()


@pytest.fixture
def kernels(request):
    """The kernels must build wherever a C compiler is present (as on CI): a failed build is a failure here."""
    dtype = request.param
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler: the tensor form serves (tested below)")
    assert lbfgs_kernels.prepare(dtype), "the L-BFGS history kernel did not build"
    return dtype


@pytest.mark.parametrize("kernels", [torch.float32, torch.float64], indirect=True)
@pytest.mark.parametrize(("H", "D", "rounds"), [(3, 37, 12), (20, 300, 50), (4, 3082, 9)])
def test_kernel_and_tensor_form_give_torch_lbfgs_direction(kernels, H, D, rounds):
    """Round after round, with histories filling, evicting (H = 3, 20: ring start moves), skipping
    pushes and one lane cleared midway, both forms give torch.optim.LBFGS's direction, the same
    history buffer bit for bit, and the same small matrices; a lane whose direction is not needed gets
    0 and keeps its history. Remainders: 2H = 6, D = 37. The kernels' rows are padded to whole
    64-byte lines; the padding stays 0."""
    dtype = kernels
    n, cpu, row = 5, torch.device("cpu"), lbfgs_kernels.row_stride(D, kernels)
    assert row % (64 // kernels.itemsize) == 0 and D <= row < D + 64 // kernels.itemsize
    c_hist, t_hist = _History(n, H, D, dtype, cpu, row), _History(n, H, D, dtype, cpu)
    pairs = [([], []) for _ in range(n)]  # per lane: torch's old_stps, old_dirs
    moved, skipped = False, 0
    tol = {"rtol": 2e-4, "atol": 2e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    for k, g, s, y, dots_new, push, need, h_diag in _rounds(n, H, D, rounds, dtype):
        if k == rounds // 2:
            for hist in (c_hist, t_hist):
                hist.clear(torch.tensor([1]))
            pairs[1] = ([], [])
        d_c = lbfgs_kernels.direction(c_hist.buf, c_hist.R, c_hist.YY, c_hist.start, c_hist.len, g, s, y, dots_new,
                                      push, need, h_diag)
        d_t = _direction(t_hist.buf, t_hist.R, t_hist.YY, t_hist.start, t_hist.len, g, s, y, dots_new, push, need,
                         h_diag)
        for lane in range(n):
            stps, dirs = pairs[lane]
            if push[lane]:
                if len(dirs) == H:
                    stps.pop(0), dirs.pop(0)
                stps.append(s[lane]), dirs.append(y[lane])
            want = _two_loop(stps, dirs, float(h_diag[lane]), g[lane]) if need[lane] else torch.zeros_like(g[lane])
            torch.testing.assert_close(d_c[lane], want, **tol)
            torch.testing.assert_close(d_t[lane], want, **tol)
        assert torch.equal(c_hist.buf[..., :D], t_hist.buf) and not c_hist.buf[..., D:].any()
        assert torch.equal(c_hist.start, t_hist.start) and torch.equal(c_hist.len, t_hist.len)
        torch.testing.assert_close(c_hist.R.triu(), t_hist.R.triu(), **tol)  # the lower triangle is never read
        torch.testing.assert_close(c_hist.YY, t_hist.YY, **tol)
        moved = moved or int(c_hist.start[0]) != 0
        skipped += int((~need).sum())
    assert skipped > 0  # some lanes sat out a round
    if row != D:  # an unpadded history would be read out of bounds: refused
        with pytest.raises(ValueError, match=r"row_stride"):
            lbfgs_kernels.direction(t_hist.buf, t_hist.R, t_hist.YY, t_hist.start, t_hist.len, g, s, y, dots_new,
                                    push, need, h_diag)
    assert moved == (rounds > H)  # the ring start moved (evictions) where the rounds outnumber the slots


@pytest.mark.parametrize("kernels", [torch.float32], indirect=True)
def test_kernel_results_do_not_depend_on_threads_or_neighbours(kernels):
    """Lanes are split over threads: 1 or 2 threads, alone or among others, a lane's result is bit for bit the same."""
    n, H, D = 6, 100, 3082
    hist = _History(n, H, D, kernels, torch.device("cpu"), lbfgs_kernels.row_stride(D, kernels))
    for _, g, s, y, dots_new, push, need, h_diag in _rounds(n, H, D, 3, kernels):
        lbfgs_kernels.direction(hist.buf, hist.R, hist.YY, hist.start, hist.len, g, s, y, dots_new, push, need, h_diag)
    state = (hist.buf, hist.R, hist.YY, hist.start, hist.len)
    before = torch.get_num_threads()
    try:
        out = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            copy = [t.clone() for t in state]
            out[threads] = lbfgs_kernels.direction(*copy, g, s, y, dots_new, push, need, h_diag), copy
    finally:
        torch.set_num_threads(before)
    assert torch.equal(out[1][0], out[2][0]) and all(torch.equal(a, b) for a, b in zip(out[1][1], out[2][1]))
    alone = [t[3:4].clone() for t in state]
    d = lbfgs_kernels.direction(*alone, g[3:4], s[3:4], y[3:4], dots_new[3:4], push[3:4], need[3:4], h_diag[3:4])
    assert torch.equal(d[0], out[1][0][3]) and all(torch.equal(a[0], b[3]) for a, b in zip(alone, out[1][1]))


def _quadratic(x: torch.Tensor, lanes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A batched closure: lane k minimises sum_i (k + 1) i x_i^2 / 2 + x_0 (curvatures differ by lane)."""
    scale = (lanes[:, None] + 1) * torch.arange(1, x.shape[1] + 1, dtype=x.dtype)
    return 0.5 * (scale * x * x).sum(1) + x[:, 0], scale * x + torch.nn.functional.one_hot(
        torch.zeros(x.shape[0], dtype=torch.long), x.shape[1]).to(x.dtype)


def test_without_kernels_the_tensor_round_serves(monkeypatch, tmp_path):
    """With the kernels the engine never runs the tensor round; a failed build warns once and the tensor
    round serves, with the same iterates; DLG_BENCH_KERNELS=0 turns the kernels off."""
    calls = []
    tensor_round = lbfgs._round
    monkeypatch.setattr(lbfgs, "_round", lambda *a: calls.append(1) or tensor_round(*a))
    x0 = torch.randn(3, 37, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    settings = LBFGSSettings(steps=4, max_iter=5, history_size=3)
    with_kernels = None
    if shutil.which("cc") or shutil.which("gcc"):
        assert lbfgs_kernels.prepare(torch.float64)
        with_kernels = BatchedLBFGS(settings, compile=False).run(_quadratic, x0)
        assert calls == []
    monkeypatch.setattr(lbfgs_kernels.KERNELS, "libs", {})
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setattr(native, "cache_dir", lambda: tmp_path)
    with pytest.warns(UserWarning, match="L-BFGS kernel unavailable"):
        assert not lbfgs_kernels.prepare(torch.float64)
    assert list(tmp_path.iterdir()) == []  # no half-written library left behind
    without = BatchedLBFGS(settings, compile=False).run(_quadratic, x0)
    assert calls and (without.final_loss < _quadratic(x0, torch.arange(3))[0]).all()  # it ran and descended
    if with_kernels is not None:
        assert with_kernels.status == without.status and torch.equal(with_kernels.closures, without.closures)
        torch.testing.assert_close(with_kernels.x, without.x, rtol=1e-12, atol=1e-12)
    monkeypatch.setattr(lbfgs_kernels.KERNELS, "libs", {})
    monkeypatch.setenv("DLG_BENCH_KERNELS", "0")
    assert not lbfgs_kernels.prepare(torch.float32)
