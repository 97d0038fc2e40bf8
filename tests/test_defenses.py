"""Property tests for the gradient defenses (defenses/)."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.errors import UserError
from defenses import DEFENSES, Defense, DefenseKind, make_defense

SHAPES = [(7,), (3, 5), (2, 3, 4, 4), (1,)]


def every_defense() -> list[Defense]:
    """Every registered defense at every grid strength (or its only one)."""
    out = []
    for name in DEFENSES.names():
        kind = DEFENSES.get(name)
        if kind.parameter is None or kind.fixed_strength is not None:
            out.append(make_defense(name))
        else:
            out.extend(make_defense(name, s) for s in kind.default_grid)
    return out


ALL = every_defense()
IDS = [d.label for d in ALL]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def grads_like(dtype: torch.dtype, seed: int = 1) -> list[torch.Tensor]:
    g = gen(seed)
    return [torch.randn(s, generator=g, dtype=torch.float32).to(dtype) for s in SHAPES]


def test_registry_contents():
    assert set(DEFENSES.names()) >= {
        "none",
        "gaussian",
        "laplacian",
        "fp16",
        "bf16",
        "int8",
        "prune",
    }
    for name in DEFENSES.names():
        kind = DEFENSES.get(name)
        assert isinstance(kind, DefenseKind) and kind.name == name
    assert DEFENSES.get("gaussian").default_grid == (1e-4, 1e-3, 1e-2, 1e-1)
    assert DEFENSES.get("gaussian").parameter == "variance"
    assert DEFENSES.get("prune").default_grid == (1, 5, 10, 20, 30, 50, 70, 90, 99)
    assert [make_defense(n).strength for n in ("fp16", "bf16", "int8")] == [16, 16, 8]
    assert make_defense("none").strength is None


def test_labels():
    assert make_defense("gaussian", 1e-3).label == "gaussian var=1e-3"
    assert make_defense("laplacian", 0.1).label == "laplacian var=1e-1"
    assert make_defense("prune", 30).label == "prune 30%"
    assert make_defense("int8").label == "int8"
    assert make_defense("none").label == "none"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("defense", ALL, ids=IDS)
def test_contract_shape_dtype_device_not_mutated(defense: Defense, dtype: torch.dtype):
    grads = grads_like(dtype)
    before = [g.clone() for g in grads]
    out = defense(grads, generator=gen())
    assert isinstance(out, list) and len(out) == len(grads)
    for g, b, o in zip(grads, before, out):
        assert o.shape == g.shape and o.dtype == g.dtype and o.device == g.device
        # new tensors, never views/aliases
        assert o is not g and o.data_ptr() != g.data_ptr()
        assert torch.equal(g, b)  # input untouched
        assert torch.isfinite(o).all()


@pytest.mark.parametrize("defense", ALL, ids=IDS)
def test_non_contiguous_input(defense: Defense):
    g = torch.randn(6, 4, generator=gen(3)).t()  # non-contiguous view
    out = defense([g], generator=gen())[0]
    assert out.shape == g.shape
    ref = defense([g.contiguous()], generator=gen())[0]
    assert torch.equal(out, ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("defense", ALL, ids=IDS)
def test_cuda_matches_cpu(defense: Defense):
    grads = grads_like(torch.float32)
    cpu = defense(grads, generator=gen(5))
    cuda = defense([g.cuda() for g in grads], generator=gen(5))
    for c, d in zip(cpu, cuda):
        assert d.device.type == "cuda"
        torch.testing.assert_close(d.cpu(), c, rtol=1e-6, atol=1e-7)


def test_none_is_identity():
    grads = grads_like(torch.float32)
    for g, o in zip(grads, make_defense("none")(grads)):
        assert torch.equal(g, o) and o is not g


# --- noise ---------------------------------------------------------------------------


def _moments(x: torch.Tensor) -> tuple[float, float, float]:
    x = x.double()
    c = x - x.mean()
    var = c.pow(2).mean()
    return float(x.mean()), float(var), float(c.pow(4).mean() / var**2)


@pytest.mark.parametrize("variance", [1e-4, 1e-2, 1.0])
@pytest.mark.parametrize("name,kurtosis", [("gaussian", 3.0), ("laplacian", 6.0)])
def test_noise_variance_and_kurtosis(name: str, kurtosis: float, variance: float):
    n = 1_000_000
    zero = torch.zeros(n, dtype=torch.float64)
    noise = make_defense(name, variance)([zero], generator=gen(11))[0]
    mean, var, kurt = _moments(noise)
    assert abs(var / variance - 1) < 0.02
    assert abs(mean) < 5 * math.sqrt(variance / n)
    assert abs(kurt - kurtosis) < (0.1 if name == "gaussian" else 0.4)


def test_laplace_and_gaussian_are_distinguishable():
    zero = torch.zeros(200_000)
    kurt = {
        n: _moments(make_defense(n, 1e-3)([zero], generator=gen(2))[0])[2]
        for n in ("gaussian", "laplacian")
    }
    assert kurt["laplacian"] > kurt["gaussian"] + 2


@pytest.mark.parametrize("name", ["gaussian", "laplacian"])
def test_noise_is_added_and_seeded(name: str):
    grads = grads_like(torch.float32)
    d = make_defense(name, 1e-2)
    a = d(grads, generator=gen(123))
    b = d(grads, generator=gen(123))
    c = d(grads, generator=gen(124))
    for x, y, z, g in zip(a, b, c, grads):
        assert torch.equal(x, y)
        assert not torch.equal(x, z)
        assert not torch.equal(x, g)
    # noise is drawn in float32 then cast: a float64 input gets the same noise
    a64 = d([g.double() for g in grads], generator=gen(123))
    for x, y, g in zip(a, a64, grads):
        torch.testing.assert_close(
            y - g.double(), (x - g).double(), rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("name", ["gaussian", "laplacian"])
def test_noise_requires_generator(name: str):
    with pytest.raises(ValueError, match="generator"):
        make_defense(name, 1e-2)(grads_like(torch.float32))


def test_laplacian_noise_finite_for_extreme_uniform_draws():
    from defenses.noise import laplace_noise

    x = laplace_noise(torch.Size([2_000_000]), 1.0, gen(0))
    assert torch.isfinite(x).all()


# --- precision -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16]
)
@pytest.mark.parametrize(
    "name,low", [("fp16", torch.float16), ("bf16", torch.bfloat16)]
)
def test_cast_roundtrip(name: str, low: torch.dtype, dtype: torch.dtype):
    grads = [g * 10 for g in grads_like(dtype)]
    for g, o in zip(grads, make_defense(name)(grads)):
        assert torch.equal(o, g.to(low).to(dtype))
        assert o.data_ptr() != g.data_ptr()


def _int8_check(g: torch.Tensor, o: torch.Tensor) -> None:
    amax = g.abs().max()
    if amax == 0:
        assert torch.equal(o, torch.zeros_like(g))
        return
    scale = amax / 127
    err = (g - o).abs().max()
    assert err <= scale / 2 * (1 + 1e-5) + 1e-12 * amax
    levels = torch.unique(o)
    assert levels.numel() <= 255
    q = o / scale
    torch.testing.assert_close(q, q.round(), rtol=0, atol=1e-4)  # on the grid
    assert q.abs().max() <= 127 + 1e-4
    torch.testing.assert_close(o.abs().max(), amax)  # the extreme value is exact


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 400),
    seed=st.integers(0, 2**31 - 1),
    log_scale=st.floats(-8, 4),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_int8_error_bound_and_levels(
    n: int, seed: int, log_scale: float, dtype: torch.dtype
):
    g = (torch.randn(n, generator=gen(seed), dtype=torch.float64) * 10**log_scale).to(
        dtype
    )
    o = make_defense("int8")([g])[0]
    _int8_check(g, o)


def test_int8_many_levels_and_zero_tensor():
    g = torch.linspace(-1, 1, 10_001)
    o = make_defense("int8")([g])[0]
    assert torch.unique(o).numel() == 255
    _int8_check(g, o)
    z = torch.zeros(3, 4)
    assert torch.equal(make_defense("int8")([z])[0], z)
    # formula, stated in the docstring
    x = torch.tensor([0.5, -1.27, 0.004, 0.006])
    scale = 1.27 / 127
    expect = torch.round(x / scale).clamp(-127, 127) * scale
    torch.testing.assert_close(make_defense("int8")([x])[0], expect)


# --- sparsity ------------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(
    shape=st.lists(st.integers(1, 12), min_size=1, max_size=3),
    p=st.one_of(
        st.sampled_from([0, 1, 5, 10, 20, 29, 30, 50, 70, 90, 99]), st.floats(0, 99.999)
    ),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_prune_exact_sparsity_and_keeps_largest(shape, p, seed, dtype):
    g = torch.randn(shape, generator=gen(seed), dtype=dtype)
    g = torch.where(g == 0, torch.ones_like(g), g)  # inputs without zeros
    o = make_defense("prune", p)([g])[0]
    n = g.numel()
    k = math.floor(Fraction(repr(float(p))) * n / 100)
    zeroed = o == 0
    assert int(zeroed.sum()) == k
    kept = ~zeroed
    assert torch.equal(o[kept], g[kept])  # kept entries unchanged
    if 0 < k < n:
        assert g[zeroed].abs().max() <= g[kept].abs().min()  # the largest ones are kept


def test_prune_integer_percent_is_exact():
    g = torch.arange(1.0, 101.0)
    for p in range(100):
        o = make_defense("prune", p)([g])[0]
        assert int((o == 0).sum()) == p
        assert torch.equal(o[p:], g[p:])


def test_prune_per_tensor_and_ties_deterministic():
    a = torch.tensor([3.0, -1.0, 2.0, -1.0, 1.0])  # three ties at |g| = 1
    b = torch.tensor([100.0, 200.0, 300.0, 400.0])
    oa, ob = make_defense("prune", 40)([a, b])
    # each tensor pruned on its own: floor(0.4*5)=2 and floor(0.4*4)=1
    # lower flat index first
    assert torch.equal(oa, torch.tensor([3.0, 0.0, 2.0, 0.0, 1.0]))
    assert torch.equal(ob, torch.tensor([0.0, 200.0, 300.0, 400.0]))
    assert torch.equal(make_defense("prune", 0)([a])[0], a)



@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 80), p=st.sampled_from([1, 10, 33, 50, 90, 99]), seed=st.integers(0, 2**31 - 1))
def test_prune_equals_stable_sort_reference_with_ties(n, p, seed):
    """The O(n) selection prunes exactly what a stable sort on |g| prunes, ties included."""
    g = torch.randint(-3, 4, (n,), generator=gen(seed)).float()  # many ties and zeros
    k = math.floor(Fraction(repr(float(p))) * n / 100)
    ref = g.clone()
    ref[torch.argsort(g.abs(), stable=True)[:k]] = 0
    assert torch.equal(make_defense("prune", p)([g])[0], ref)

# --- validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,strength,needle",
    [
        ("gaussian", -1, "defense.gaussian: variance must be > 0, got -1"),
        ("gaussian", 0, "defense.gaussian: variance must be > 0, got 0"),
        ("laplacian", float("nan"), "defense.laplacian: variance"),
        ("gaussian", float("inf"), "defense.gaussian: variance must be finite"),
        ("gaussian", None, "defense.gaussian: variance is required"),
        ("gaussian", "abc", "defense.gaussian: variance must be a number"),
        ("gaussian", True, "defense.gaussian: variance must be a number"),
        ("prune", 150, "defense.prune: sparsity must be in [0, 100) percent, got 150"),
        ("prune", 100, "defense.prune: sparsity must be in [0, 100) percent, got 100"),
        (
            "prune",
            -0.5,
            "defense.prune: sparsity must be in [0, 100) percent, got -0.5",
        ),
        ("fp16", 8, "defense.fp16: bits is fixed at 16"),
        ("int8", 16, "defense.int8: bits is fixed at 8"),
        ("none", 1, "defense.none: takes no strength"),
    ],
)
def test_bad_strength_is_one_line_user_error(name, strength, needle):
    with pytest.raises(UserError) as exc:
        make_defense(name, strength)
    msg = str(exc.value)
    assert "\n" not in msg
    assert needle in msg


def test_custom_key_and_equal_fixed_strength():
    with pytest.raises(UserError, match=r"^grid\.defenses\.prune: sparsity"):
        make_defense("prune", 101, key="grid.defenses")
    assert make_defense("int8", 8).strength == 8
    # numeric strings from YAML
    assert make_defense("gaussian", "1e-3").strength == 1e-3


def test_unknown_name_lists_allowed():
    with pytest.raises(UserError) as exc:
        make_defense("gausian", 1e-3)
    msg = str(exc.value)
    assert "\n" not in msg and "gausian" in msg and msg.startswith("defense")
    for name in DEFENSES.names():
        assert name in msg
