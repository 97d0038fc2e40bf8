"""The C kernels of the L-BFGS history passes compute the batched matrix products they replace."""

from __future__ import annotations

import shutil

import pytest
import torch

from attacks import lbfgs_kernels
from attacks.lbfgs_kernels import history_dots, history_write_combine


def _case(n: int, H: int, D: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    buf = torch.randn(n, 2 * H, D, generator=gen, dtype=dtype)
    g, y, s, base = (torch.randn(n, D, generator=gen, dtype=dtype) for _ in range(4))
    coef = torch.randn(n, 2 * H, generator=gen, dtype=dtype)
    slot = torch.randint(0, H, (n,), generator=gen)
    push = torch.arange(n) % 3 != 1  # some lanes take no new pair
    return buf, g, y, s, base, coef, slot, push


def _reference(buf, g, y, s, base, coef, slot, push):
    dots = torch.einsum("nrd,nkd->nrk", buf, torch.stack([g, y], 1))
    new = buf.clone()
    H = buf.shape[1] // 2
    for lane in range(buf.shape[0]):
        if push[lane]:
            new[lane, slot[lane]], new[lane, H + slot[lane]] = s[lane], y[lane]
    return dots, new, base + torch.einsum("nr,nrd->nd", coef, new)


@pytest.fixture
def kernels(request):
    """The kernels must build wherever a C compiler is present (as on CI): a failed build is a failure here."""
    dtype = request.param
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler: the bmm fallback serves (tested below)")
    assert lbfgs_kernels.prepare(dtype), "the L-BFGS history kernels did not build"
    return dtype


@pytest.mark.parametrize("kernels", [torch.float32, torch.float64], indirect=True)
@pytest.mark.parametrize(("H", "D"), [(3, 37), (100, 3082)])
def test_kernels_compute_the_history_products(kernels, H, D):
    """Pass 1 (dots with g and y) and the write + pass 2 (base + coef @ history) equal the matrix
    products on random data, with row counts and widths that leave remainders (2H = 6, D = 37)."""
    dtype = kernels
    buf, g, y, s, base, coef, slot, push = _case(5, H, D, dtype)
    want_dots, want_buf, want_d = _reference(buf, g, y, s, base, coef, slot, push)
    tol = {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-11}
    torch.testing.assert_close(history_dots(buf, g, y), want_dots, **tol)
    d = history_write_combine(buf, slot, push, s, y, coef, base)
    assert torch.equal(buf, want_buf)  # written in place, exactly
    torch.testing.assert_close(d, want_d, **tol)


@pytest.mark.parametrize("kernels", [torch.float32], indirect=True)
def test_kernels_results_do_not_depend_on_threads_or_neighbours(kernels):
    """Lanes are split over threads: 1 or 2 threads, alone or among others, a lane's result is bit for bit the same."""
    buf, g, y, s, base, coef, slot, push = _case(6, 100, 3082, kernels)
    before = torch.get_num_threads()
    try:
        out = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            b = buf.clone()
            out[threads] = history_dots(b, g, y), history_write_combine(b, slot, push, s, y, coef, base)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(out[1], out[2]))
    b = buf[3:4].clone()
    alone = history_dots(b, g[3:4], y[3:4]), history_write_combine(b, slot[3:4], push[3:4], s[3:4], y[3:4],
                                                                   coef[3:4], base[3:4])
    assert torch.equal(alone[0][0], out[1][0][3]) and torch.equal(alone[1][0], out[1][1][3])


def test_without_kernels_the_matrix_products_serve(monkeypatch, tmp_path):
    """A failed build warns once and falls back to bmm/baddbmm; DLG_BENCH_KERNELS=0 turns the kernels off."""
    monkeypatch.setattr(lbfgs_kernels, "_LIBS", {})
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setattr(lbfgs_kernels, "_cache_dir", lambda: tmp_path)
    with pytest.warns(UserWarning, match="L-BFGS history kernels unavailable"):
        assert not lbfgs_kernels.prepare(torch.float64)
    assert list(tmp_path.iterdir()) == []  # no half-written library left behind
    buf, g, y, s, base, coef, slot, push = _case(4, 3, 37, torch.float64)
    want_dots, want_buf, want_d = _reference(buf, g, y, s, base, coef, slot, push)
    torch.testing.assert_close(history_dots(buf, g, y), want_dots, rtol=1e-12, atol=1e-11)
    torch.testing.assert_close(history_write_combine(buf, slot, push, s, y, coef, base), want_d, rtol=1e-12,
                               atol=1e-11)
    assert torch.equal(buf, want_buf)
    monkeypatch.setattr(lbfgs_kernels, "_LIBS", {})
    monkeypatch.setenv("DLG_BENCH_KERNELS", "0")
    assert not lbfgs_kernels.prepare(torch.float32)
