"""ContinuumMemory: exact k-NN (against brute-force sorting, on the brute-force and the pruned
paths), local linear prediction, eviction, validation, and exact state/file round trips."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from chronos.continuum import ContinuumMemory, MemoryEntry, knn
from chronos.continuum.knn import ExactKNNIndex
from chronos.continuum.local_linear import local_linear_fit
from chronos.core.errors import (
    ChronosTypeError,
    ConfigError,
    CorruptFileError,
    KeyMismatchError,
    NonFiniteError,
    ShapeMismatchError,
)
from chronos.core.safeio import save_tensors

pytestmark = pytest.mark.timeout(60)
f64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Timings and tie-breaking are checked on one torch thread (see tests/conftest.py)."""


def brute(points, q, k, metric="euclidean", dtype=torch.float32):
    """Indices and distances of the k nearest points (rounded to the storage dtype), ties to
    the lower index: the definition the memory must match."""
    x = torch.stack(points).to(dtype).to(f64)
    q = q.to(dtype).to(f64)
    if metric == "cosine":
        d = (1.0 - (x @ q) / (x.norm(dim=1) * q.norm())).clamp_min(0.0)
    else:
        d = (x - q).norm(dim=1)
    order = torch.argsort(d, stable=True)[:k]  # stable: ties to the lower index
    return order.tolist(), d[order]


def filled(points, metric="euclidean", capacity=None, **kw):
    mem = ContinuumMemory(capacity=capacity or max(1, len(points)), metric=metric, **kw)
    for i, p in enumerate(points):
        mem.store(p, torch.zeros_like(p), 0.0, i)
    return mem


def walk(n, dim, trajectories=4, step=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    starts = torch.randn(trajectories, dim, generator=g) * 3
    steps = torch.randn(trajectories, n // trajectories, dim, generator=g) * step
    return list((starts[:, None] + steps.cumsum(1)).reshape(-1, dim))


# -- retrieval -------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("kind", ["walk", "iso"])
def test_retrieval_equals_brute_force_small(metric, kind):
    g = torch.Generator().manual_seed(1)
    pts = walk(200, 7) if kind == "walk" else list(torch.randn(200, 7, generator=g))
    mem = filled(pts, metric)
    for t in range(20):
        q = pts[t * 7] + 0.1 * torch.randn(7, generator=g)
        k = 1 + t % 9
        got = mem.retrieve_similar(q, k=k)
        idx, dist = brute(pts, q, k, metric)
        assert [e.index for e in got] == idx
        assert torch.allclose(torch.tensor([e.distance for e in got], dtype=f64), dist,
                              rtol=1e-9, atol=1e-12)
        assert all(isinstance(e, MemoryEntry) for e in got)


def _spy(monkeypatch):
    calls = {"build": 0, "screen": 0}
    for name in calls:
        original = getattr(ExactKNNIndex, f"_{name}")

        def spy(self, *a, _name=name, _original=original):
            calls[_name] += 1
            return _original(self, *a)

        monkeypatch.setattr(ExactKNNIndex, f"_{name}", spy)
    return calls


def _data(kind, n, dim, seed):
    if kind == "walk":
        return walk(n, dim, step=0.02, seed=seed)
    return list(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)))


def _query(pts, kind, g):
    j = int(torch.randint(0, len(pts), (1,), generator=g))
    noise = torch.randn(pts[0].shape[0], generator=g)
    return pts[j] + 0.01 * noise if kind == "walk" else noise


@pytest.mark.parametrize("metric, kind", [("euclidean", "walk"), ("cosine", "iso")])
def test_retrieval_equals_brute_force_on_the_pruned_path(metric, kind, monkeypatch):
    """6,000 entries of dim 300: above the brute-force cutoff, so the subspace bound (and, on
    isotropic keys, the matrix-vector screen) decide what is examined."""
    calls = _spy(monkeypatch)
    g = torch.Generator().manual_seed(2)
    pts = _data(kind, 6000, 300, seed=2)
    mem = filled(pts, metric)
    for t in range(6):
        q = _query(pts, kind, g)
        k = (1, 5, 40)[t % 3]
        got = mem.retrieve_similar(q, k=k)
        idx, dist = brute(pts, q, k, metric)
        assert [e.index for e in got] == idx
        assert torch.allclose(torch.tensor([e.distance for e in got], dtype=f64), dist,
                              rtol=1e-9, atol=1e-12)
    assert calls["build"] == 1
    if kind == "iso":
        assert calls["screen"] >= 1


@pytest.mark.parametrize("metric, kind", [("euclidean", "iso"), ("cosine", "walk"),
                                          ("cosine", "iso")])
def test_index_equals_brute_force_on_the_pruned_path(metric, kind, monkeypatch):
    calls = _spy(monkeypatch)
    g = torch.Generator().manual_seed(3)
    pts = _data(kind, 6000, 300, seed=3)
    index = ExactKNNIndex(300, torch.float32, 6000, metric)
    index.add_many(torch.stack(pts), torch.arange(6000))
    for t in range(6):
        q = _query(pts, kind, g)
        k = (1, 5, 40)[t % 3]
        slots, dist = index.search(q, k)
        idx, expect = brute(pts, q, k, metric)
        assert slots.tolist() == idx
        assert torch.allclose(dist, expect, rtol=1e-9, atol=1e-12)
    assert calls["build"] == 1
    if kind == "iso":
        assert calls["screen"] >= 1


@given(
    data=st.lists(st.lists(st.integers(-2, 2), min_size=3, max_size=3), min_size=1, max_size=25),
    q=st.lists(st.integers(-2, 2), min_size=3, max_size=3),
    k=st.integers(1, 30),
    metric=st.sampled_from(["euclidean", "cosine"]),
)
def test_retrieval_property_with_ties(data, q, k, metric):
    pts = [torch.tensor(p, dtype=torch.float32) for p in data]
    qt = torch.tensor(q, dtype=torch.float32)
    if metric == "cosine":
        pts = [p for p in pts if p.abs().sum() > 0]
        if not pts or qt.abs().sum() == 0:
            return
    mem = filled(pts, metric)
    got = mem.retrieve_similar(qt, k=k)
    idx, dist = brute(pts, qt, k, metric)
    assert [e.index for e in got] == idx
    assert torch.allclose(torch.tensor([e.distance for e in got], dtype=f64), dist,
                          rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("kind", ["walk", "iso"])
def test_screened_scan_of_a_small_memory_equals_brute_force(metric, kind, monkeypatch):
    """3,000 keys of dim 100 (at most brute_force_max, N·D above the plain-scan size): the
    float32 screen orders the exact distances, no subspace is fitted."""
    calls = _spy(monkeypatch)
    monkeypatch.setattr(knn, "_FIRST_CHUNK", 4)
    g = torch.Generator().manual_seed(11)
    pts = _data(kind, 3000, 100, seed=11)
    index = ExactKNNIndex(100, torch.float32, 3000, metric)
    index.add_many(torch.stack(pts), torch.arange(3000))
    mask = torch.arange(3000) % 2 == 1
    for t in range(12):
        q = _query(pts, kind, g)
        k = (1, 4, 30)[t % 3]
        slots, dist = index.search(q, k)
        idx, expect = brute(pts, q, k, metric)
        assert slots.tolist() == idx
        assert torch.allclose(dist, expect, rtol=1e-9, atol=1e-12)
        slots, _ = index.search(q, k, mask=mask)
        assert slots.tolist() == [2 * i + 1 for i in brute(pts[1::2], q, k, metric)[0]]
    assert calls["build"] == 0 and calls["screen"] == 24


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_pruned_search_stops_exactly_with_tiny_chunks(metric, monkeypatch):
    """Chunks of 2 make the stopping rule decide after almost every exact distance."""
    monkeypatch.setattr(knn, "_FIRST_CHUNK", 2)
    g = torch.Generator().manual_seed(5)
    pts = _data("walk", 1000, 40, seed=5) + _data("iso", 1000, 40, seed=6)
    index = ExactKNNIndex(40, torch.float32, 2000, metric, index_dims=4, brute_force_max=10)
    index.add_many(torch.stack(pts), torch.arange(2000))
    for t in range(40):
        q = _query(pts, "walk", g) * (1 + t % 4) + (t % 3) * torch.randn(40, generator=g)
        k = (1, 3, 10)[t % 3]
        slots, dist = index.search(q, k)
        idx, expect = brute(pts, q, k, metric)
        assert slots.tolist() == idx
        assert torch.allclose(dist, expect, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float32, f64])
def test_both_lower_bounds_hold_for_every_key(metric, dtype):
    """Far from the origin, with near-duplicate keys: the subspace bound and the screen never
    exceed an exact distance (the pruning's only premise)."""
    g = torch.Generator().manual_seed(7)
    base = torch.stack(walk(600, 50, step=1e-3, seed=7)).to(dtype) + 1e3
    keys = torch.cat([base, base[:50] + 1e-6, torch.randn(100, 50, generator=g).to(dtype)])
    index = ExactKNNIndex(50, dtype, len(keys), metric, index_dims=8, brute_force_max=0)
    index.add_many(keys, torch.arange(len(keys)))
    for t in range(10):
        q = index.prepare_query(keys[t * 70] + 1e-4 * t * torch.randn(50, generator=g).to(dtype))
        d = index._exact(torch.arange(len(keys)), q)
        exact2 = 2 * d if metric == "cosine" else d**2  # squared search-space distances
        assert (index._subspace_lb2(q) <= exact2).all()
        assert (index._screen(q) <= exact2).all()
        if metric == "euclidean":  # and it is not trivially zero (centred, so tight here)
            assert (index._subspace_lb2(q) > 0.5 * exact2).float().mean() > 0.5


@given(
    data=st.lists(st.lists(st.integers(-3, 3), min_size=4, max_size=4), min_size=1, max_size=40),
    q=st.lists(st.integers(-3, 3), min_size=4, max_size=4),
    k=st.integers(1, 45),
    metric=st.sampled_from(["euclidean", "cosine"]),
    brute_force_max=st.sampled_from([0, 1000]),
    index_dims=st.integers(1, 3),
)
def test_screened_and_pruned_paths_property_with_ties(data, q, k, metric, brute_force_max,
                                                      index_dims):
    """Tiny integer keys forced through the screen (brute_force_max=1000) or the subspace bound
    (0), one candidate per chunk: exact ties must still go to the lower index."""
    x = torch.tensor(data, dtype=torch.float32)
    qt = torch.tensor(q, dtype=torch.float32)
    if metric == "cosine":
        x = x[x.abs().sum(1) > 0]
        if len(x) == 0 or qt.abs().sum() == 0:
            return
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(knn, "_SCAN_MAX", 0)
        mp.setattr(knn, "_FIRST_CHUNK", 1)
        index = ExactKNNIndex(4, torch.float32, len(x), metric, index_dims, brute_force_max)
        index.add_many(x, torch.arange(len(x)))
        slots, dist = index.search(qt, k)
    idx, expect = brute(list(x), qt, k, metric)
    assert slots.tolist() == idx
    assert torch.allclose(dist, expect, rtol=1e-9, atol=1e-12)


def test_pruned_search_with_a_mask_matches_brute_force():
    pts = torch.stack(walk(5000, 64, step=0.05, seed=3))
    index = ExactKNNIndex(64, torch.float32, 5000, brute_force_max=100)
    index.add_many(pts, torch.arange(5000))
    mask = torch.arange(5000) % 3 == 0
    for j in (0, 1234, 4999):
        slots, _ = index.search(pts[j] + 0.01, k=7, mask=mask)
        idx, _ = brute([p for p in pts[mask]], pts[j] + 0.01, 7)
        assert slots.tolist() == [3 * i for i in idx]


def test_ties_go_to_the_lower_index_and_k_larger_than_size_returns_all():
    p = torch.tensor([1.0, 1.0])
    mem = filled([p, p + 1, p, p])
    assert [e.index for e in mem.retrieve_similar(p, k=3)] == [0, 2, 3]
    got = mem.retrieve_similar(p, k=100)
    assert [e.index for e in got] == [0, 2, 3, 1]
    assert [e.distance for e in got][:3] == [0.0, 0.0, 0.0]
    assert got[3].distance == pytest.approx(math.sqrt(2))


def test_bad_k_and_empty_memory_are_clear_errors():
    mem = ContinuumMemory(k=3)
    for call in (lambda: mem.retrieve_similar(torch.zeros(2)),
                 lambda: mem.predict(torch.zeros(2)),
                 lambda: mem.predict_change(torch.zeros(2), torch.ones(2))):
        with pytest.raises(ConfigError, match="the memory is empty; store"):
            call()
    assert mem.latest() is None and len(mem) == 0
    mem.store(torch.zeros(2), torch.zeros(2), 0.0, 0)
    for k in (0, -1):
        with pytest.raises(ConfigError, match="k must be >= 1"):
            mem.retrieve_similar(torch.zeros(2), k=k)
    with pytest.raises(ChronosTypeError, match="k must be an int"):
        mem.predict(torch.zeros(2), k=2.0)
    with pytest.raises(ConfigError, match="k must be an int >= 1"):
        ContinuumMemory(k=0)
    with pytest.raises(ConfigError, match="metric"):
        ContinuumMemory(metric="manhattan")
    with pytest.raises(ConfigError, match="eviction"):
        ContinuumMemory(eviction="lru")


# -- prediction ------------------------------------------------------------------------------


def linear_field(n, seed=0, dim=3, out=None):
    """λ = {"a": [2], "b": []} in float64, g = g0 + A·x on the flattened λ ("a" then "b")."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(out or dim, dim, generator=g, dtype=f64)
    g0 = torch.randn(out or dim, generator=g, dtype=f64)
    xs = torch.randn(n, dim, generator=g, dtype=f64)

    def as_dict(x):
        return {"a": x[:2].clone(), "b": x[2].clone()}

    return a, g0, xs, as_dict


def test_prediction_is_exact_on_a_linear_field_with_k_above_d():
    a, g0, xs, as_dict = linear_field(40)
    b = torch.randn(4, 3, dtype=f64, generator=torch.Generator().manual_seed(9))
    mem = ContinuumMemory()
    for i, x in enumerate(xs):
        mem.store(as_dict(x), as_dict(g0 + a @ x), 0.1, i, inner_solution={"w": b @ x})
    for q in (torch.tensor([0.1, -0.2, 0.3], dtype=f64), xs[:5].mean(0) + 0.01):
        pred = mem.predict(as_dict(q), k=10)
        expect = g0 + a @ q
        assert pred["b"].dtype == f64 and pred["b"].shape == ()
        assert torch.allclose(torch.cat([pred["a"], pred["b"][None]]), expect, atol=1e-9)
        assert torch.allclose(mem.predict_gradient(as_dict(q), k=10)["a"], expect[:2], atol=1e-9)
        assert torch.allclose(mem.predict(as_dict(q), "inner_solution", k=10)["w"], b @ q,
                              atol=1e-9)


def test_predict_change_is_the_jacobian_times_the_step():
    a, g0, xs, as_dict = linear_field(30, seed=1)
    mem = ContinuumMemory(k=8)
    for i, x in enumerate(xs):
        mem.store(as_dict(x), as_dict(g0 + a @ x), 0.0, i)
    frm, to = xs[3] + 0.05, xs[3] + torch.tensor([0.3, -0.1, 0.2], dtype=f64)
    delta = mem.predict_change(as_dict(frm), as_dict(to))
    expect = a @ (to - frm)
    assert torch.allclose(torch.cat([delta["a"], delta["b"][None]]), expect, atol=1e-9)
    at_stored = mem.predict_change(as_dict(xs[3]), as_dict(to))  # from a stored point
    assert torch.allclose(torch.cat([at_stored["a"], at_stored["b"][None]]), a @ (to - xs[3]),
                          atol=1e-8)


def test_prediction_at_a_stored_point_is_its_value_exactly():
    g = torch.Generator().manual_seed(4)
    pts = list(torch.randn(20, 5, generator=g))
    vals = list(torch.randn(20, 5, generator=g))  # no structure at all
    mem = ContinuumMemory(k=6)
    for i, (p, v) in enumerate(zip(pts, vals, strict=True)):
        mem.store(p, v, 0.0, i)
    for j in (0, 7, 19):
        assert torch.equal(mem.predict(pts[j])["params"], vals[j])
    mem.store(pts[7], vals[7] + 2.0, 0.0, 20)  # a duplicate point: the mean at distance 0
    assert torch.allclose(mem.predict(pts[7])["params"], vals[7] + 1.0, atol=1e-6)


def test_collinear_neighbours_extrapolate_flat_off_their_line():
    a, g0, _, _ = linear_field(0, seed=5)
    direction = torch.tensor([1.0, 2.0, -1.0], dtype=f64)
    mem = ContinuumMemory(k=5)
    for i, t in enumerate(torch.linspace(-1, 1, 9, dtype=f64)):
        x = t * direction
        mem.store(x, g0 + a @ x, 0.0, i)
    off = torch.tensor([0.0, 0.0, 1.0], dtype=f64)
    q = 0.2 * direction + off - (off @ direction) / (direction @ direction) * direction
    foot = 0.2 * direction  # q's projection on the line
    pred = mem.predict(q, k=5)["params"]
    assert torch.isfinite(pred).all()
    assert torch.allclose(pred, g0 + a @ foot, atol=1e-9)


@pytest.mark.parametrize("case", ["duplicates", "opposite", "single", "far", "huge"])
def test_prediction_is_finite_on_adversarial_inputs(case):
    mem = ContinuumMemory(k=5)
    p, e = torch.tensor([1.0, 2.0]), torch.tensor([1e-3, 0.0])
    if case == "duplicates":
        for i in range(4):
            mem.store(p, torch.tensor([float(i), -float(i)]), 0.0, i)
    elif case == "opposite":
        mem.store(p, torch.tensor([1.0, 1.0]), 0.0, 0)
        mem.store(p + e, torch.tensor([-1.0, -1.0]), 0.0, 1)
        mem.store(p - e, torch.tensor([-1.0, -1.0]), 0.0, 2)
    elif case == "single":
        mem.store(p, torch.tensor([3.0, 4.0]), 0.0, 0)
    elif case == "far":
        for i in range(5):
            mem.store(p + i * e, torch.tensor([1e30, -1e30]) * (-1) ** i, 0.0, i)
    else:
        for i in range(5):
            mem.store(p * 1e30 + i * 1e24, torch.tensor([1e38, 0.0]) * (-1) ** i, 0.0, i)
    for q in (p, p + 0.5, p * 1e6, p + e / 2):
        out = mem.predict(q)["params"]
        assert torch.isfinite(out).all(), (case, q)
        change = mem.predict_change(q, q + 1.0)["params"]
        assert torch.isfinite(change).all(), (case, q)
    if case == "single":
        assert torch.equal(mem.predict(p * 7)["params"], torch.tensor([3.0, 4.0]))
        assert torch.equal(mem.predict_change(p, p * 7)["params"], torch.zeros(2))
    if case == "duplicates":
        assert torch.allclose(mem.predict(p)["params"], torch.tensor([1.5, -1.5]))


def test_local_linear_fit_falls_back_to_the_nearest_value_when_not_finite():
    x = torch.tensor([[0.0], [1.0]], dtype=f64)
    g = torch.tensor([[1e308], [-1e308]], dtype=f64)
    m = local_linear_fit(x, g, torch.tensor([10.0], dtype=f64), torch.tensor([10.0, 9.0],
                                                                             dtype=f64))
    assert torch.equal(m.value, g[1])


def test_predict_uses_only_entries_holding_the_extra():
    mem = ContinuumMemory(k=3)
    mem.store(torch.tensor([0.0]), torch.tensor([0.0]), 0.0, 0, inner_solution={"w": torch.ones(2)})
    for i in range(1, 6):
        mem.store(torch.tensor([10.0 + i]), torch.tensor([0.0]), 0.0, i, worker="w1")
    assert torch.equal(mem.predict(torch.tensor([12.0]), "inner_solution")["w"], torch.ones(2))
    with pytest.raises(ConfigError, match="neither 'hypergradient' nor an extra holding"):
        mem.predict(torch.tensor([12.0]), "worker")


# -- storage, eviction, validation -------------------------------------------------------------


def test_fifo_keeps_exactly_the_newest():
    mem = ContinuumMemory(capacity=5)
    for i in range(12):
        assert mem.store(torch.tensor([float(i)]), torch.tensor([1.0]), 0.0, i) == i
    assert len(mem) == 5
    held = sorted(e.index for e in mem.retrieve_similar(torch.tensor([0.0]), k=10))
    assert held == [7, 8, 9, 10, 11]
    assert mem.latest().index == 11 and mem.latest().step == 11


def _reservoir(seed, n=100, capacity=10):
    mem = ContinuumMemory(capacity=capacity, eviction="reservoir", seed=seed)
    for i in range(n):
        mem.store(torch.tensor([float(i)]), torch.tensor([0.0]), 0.0, i)
    return mem, sorted(e.index for e in mem.retrieve_similar(torch.tensor([0.0]), k=capacity))


def test_reservoir_keeps_capacity_is_deterministic_and_uniform():
    mem, held = _reservoir(0)
    assert len(mem) == 10 and len(set(held)) == 10
    assert _reservoir(0)[1] == held and _reservoir(1)[1] != held
    assert mem.latest().index == max(held)
    firsts = [i < 30 for s in range(30) for i in _reservoir(s, n=60)[1]]
    assert 0.4 < sum(firsts) / len(firsts) < 0.6  # a uniform sample of the whole history


def test_mismatches_and_non_finite_values_store_nothing():
    mem = ContinuumMemory()
    lam = {"a": torch.ones(2), "b": torch.tensor(0.5)}
    bad = [
        (({"a": torch.ones(2)}, {"a": torch.ones(2)}), KeyMismatchError, "expected \\['a', 'b'\\]"),
        (({"a": torch.ones(3), "b": 0.5}, {"a": torch.ones(3), "b": 0.5}), ShapeMismatchError,
         r"expected \(2,\), got \(3,\)"),
        ((lam, {"a": torch.ones(2)}), KeyMismatchError, "same keys"),
        (({"a": torch.tensor([1.0, math.nan]), "b": 0.5}, lam), NonFiniteError, "outer_params"),
        ((lam, {"a": torch.tensor([math.inf, 0.0]), "b": 0.5}), NonFiniteError, "hypergradient"),
    ]
    mem.store(lam, lam, 0.0, 0)
    for (p, g), err, match in bad:
        with pytest.raises(err, match=match):
            mem.store(p, g, 0.0, 1)
    with pytest.raises(NonFiniteError, match="val_loss"):
        mem.store(lam, lam, math.nan, 1)
    with pytest.raises(NonFiniteError, match="extra 'theta'"):
        mem.store(lam, lam, 0.0, 1, theta={"w": torch.tensor([math.inf])})
    with pytest.raises(NonFiniteError, match="extra 'acc'"):
        mem.store(lam, lam, 0.0, 1, acc=math.inf)
    with pytest.raises(ChronosTypeError, match="extras may be"):
        mem.store(lam, lam, 0.0, 1, worker=None)
    with pytest.raises(KeyMismatchError, match="params must have the keys"):
        mem.retrieve_similar({"a": torch.ones(2)})
    with pytest.raises(NonFiniteError, match="finite query"):
        mem.predict({"a": torch.ones(2), "b": math.nan})
    assert len(mem) == 1 and mem.latest().index == 0
    assert mem.store(lam, lam, 0.0, 1) == 1  # the counter did not move on failures


def test_first_failed_store_fixes_nothing_and_extras_keep_their_structure():
    mem = ContinuumMemory()
    with pytest.raises(NonFiniteError):
        mem.store({"x": torch.tensor([math.nan])}, {"x": torch.zeros(1)}, 0.0, 0)
    mem.store({"y": torch.zeros(3)}, {"y": torch.zeros(3)}, 0.0, 0, theta={"w": torch.zeros(2)})
    with pytest.raises(ShapeMismatchError, match="extra 'theta'"):
        mem.store({"y": torch.ones(3)}, {"y": torch.zeros(3)}, 0.0, 1, theta={"w": torch.zeros(5)})
    with pytest.raises(ChronosTypeError, match="held a TensorDict"):
        mem.store({"y": torch.ones(3)}, {"y": torch.zeros(3)}, 0.0, 1, theta=1.0)
    assert len(mem) == 1


def test_storage_dtype_follows_the_params_and_cosine_refuses_zero_norm():
    mem = ContinuumMemory()
    mem.store({"x": torch.ones(2, dtype=f64)}, {"x": torch.ones(2, dtype=f64)}, 0.0, 0)
    assert mem.predict({"x": torch.ones(2)})["x"].dtype == f64
    mem32 = ContinuumMemory()
    mem32.store({"x": torch.ones(2)}, {"x": torch.ones(2)}, 0.0, 0)
    assert mem32.predict({"x": torch.ones(2, dtype=f64)})["x"].dtype == torch.float32
    cos = ContinuumMemory(metric="cosine")
    with pytest.raises(ConfigError, match="norm zero"):
        cos.store(torch.zeros(2), torch.zeros(2), 0.0, 0)
    assert len(cos) == 0
    cos.store(torch.ones(2), torch.zeros(2), 0.0, 0)
    with pytest.raises(ConfigError, match="norm zero"):
        cos.retrieve_similar(torch.zeros(2))
    assert cos.retrieve_similar(torch.tensor([2.0, 2.0]))[0].distance == pytest.approx(0.0)


# -- state and files -------------------------------------------------------------------------


def _rich_memory(eviction="fifo", n=30, capacity=20):
    g = torch.Generator().manual_seed(6)
    mem = ContinuumMemory(capacity=capacity, k=4, eviction=eviction, seed=3)
    for i in range(n):
        lam = {"w": torch.randn(3, generator=g), "s": torch.randn((), generator=g)}
        extra = {"worker": f"w{i % 2}", "acc": 0.5 + i, "ok": i % 2 == 0, "n": i}
        if i % 3:
            extra["inner_solution"] = {"theta": torch.randn(2, 2, generator=g)}
        if i % 4 == 0:
            extra["trace"] = torch.arange(i % 5, dtype=torch.int64)
        mem.store(lam, {"w": torch.randn(3, generator=g), "s": torch.tensor(0.1)}, 1.0 / (i + 1),
                  i, **extra)
    return mem


def _same(a, b):
    q = {"w": torch.tensor([0.1, 0.2, 0.3]), "s": torch.tensor(-0.5)}
    ra, rb = a.retrieve_similar(q, k=50), b.retrieve_similar(q, k=50)
    assert [(e.index, e.distance, e.step, e.val_loss) for e in ra] == [
        (e.index, e.distance, e.step, e.val_loss) for e in rb]
    for ea, eb in zip(ra, rb, strict=True):
        assert set(ea.extra) == set(eb.extra)
        for name, v in ea.extra.items():
            w = eb.extra[name]
            if isinstance(v, dict):
                assert all(torch.equal(v[k], w[k]) for k in v)
            elif isinstance(v, torch.Tensor):
                assert torch.equal(v, w) and v.dtype == w.dtype
            else:
                assert v == w and type(v) is type(w)
        for part in ("outer_params", "hypergradient"):
            assert all(torch.equal(getattr(ea, part)[k], getattr(eb, part)[k])
                       for k in getattr(ea, part))
    for key in ("hypergradient", "inner_solution"):
        pa, pb = a.predict(q, key), b.predict(q, key)
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert a.latest().index == b.latest().index and len(a) == len(b)


@pytest.mark.parametrize("eviction", ["fifo", "reservoir"])
def test_state_dict_round_trip_is_exact_and_continues_identically(eviction):
    a = _rich_memory(eviction)
    b = ContinuumMemory(capacity=3, metric="cosine")  # its own config is replaced
    b.load_state_dict(a.state_dict())
    assert (b.capacity, b.metric, b.eviction, b.seed) == (20, "euclidean", eviction, 3)
    _same(a, b)
    for i in range(30, 45):  # the generator state travels too
        for m in (a, b):
            m.store({"w": torch.full((3,), i / 10.0), "s": torch.tensor(0.0)},
                    {"w": torch.zeros(3), "s": torch.tensor(0.0)}, 0.0, i)
    _same(a, b)


@pytest.mark.parametrize("eviction", ["fifo", "reservoir"])
def test_save_load_round_trip_is_exact(tmp_path, eviction):
    a = _rich_memory(eviction)
    a.save(tmp_path / "mem.chronos")
    b = ContinuumMemory.load(tmp_path / "mem.chronos")
    _same(a, b)
    for i in range(30, 40):
        for m in (a, b):
            m.store({"w": torch.full((3,), i / 7.0), "s": torch.tensor(1.0)},
                    {"w": torch.ones(3), "s": torch.tensor(0.0)}, 0.0, i)
    _same(a, b)
    ContinuumMemory(capacity=7).save(tmp_path / "empty")
    empty = ContinuumMemory.load(tmp_path / "empty")
    assert len(empty) == 0 and empty.capacity == 7


def test_save_load_round_trip_on_the_pruned_path(tmp_path):
    pts = walk(4100, 40, seed=8)
    a = filled(pts, capacity=5000)
    a.save(tmp_path / "big")
    b = ContinuumMemory.load(tmp_path / "big")
    for j in (5, 4050):
        ra, rb = a.retrieve_similar(pts[j] + 0.01, k=6), b.retrieve_similar(pts[j] + 0.01, k=6)
        assert [(e.index, e.distance) for e in ra] == [(e.index, e.distance) for e in rb]


def test_corrupt_or_foreign_memory_files_and_states_are_refused(tmp_path):
    a = _rich_memory()
    a.save(tmp_path / "m")
    data = bytearray((tmp_path / "m").read_bytes())
    data[len(data) // 2] ^= 0x10
    (tmp_path / "bad").write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="bad"):
        ContinuumMemory.load(tmp_path / "bad")
    save_tensors(tmp_path / "other", {"x": torch.zeros(1)}, {"format": "something else"})
    with pytest.raises(CorruptFileError, match="not a valid ContinuumMemory file"):
        ContinuumMemory.load(tmp_path / "other")
    state = a.state_dict()
    state["keys"] = state["keys"] + 1.0
    b = _rich_memory()
    with pytest.raises(ConfigError, match="does not match"):
        b.load_state_dict(state)
    state = a.state_dict()
    state["entries"][0]["hypergradient"] = {"w": torch.zeros(4), "s": torch.tensor(0.0)}
    with pytest.raises(ShapeMismatchError):
        b.load_state_dict(state)
    with pytest.raises(ConfigError, match=r"generator_state|ContinuumMemory"):
        b.load_state_dict({**a.state_dict(),
                           "generator_state": torch.zeros(3, dtype=torch.uint8)})
    _same(b, _rich_memory())  # unchanged by the failed loads


def test_clear_forgets_the_key_set():
    mem = ContinuumMemory(eviction="reservoir")
    mem.store({"a": torch.ones(1)}, {"a": torch.ones(1)}, 0.0, 0)
    mem.clear()
    assert len(mem) == 0 and mem.latest() is None
    assert mem.store({"b": torch.ones(2)}, {"b": torch.ones(2)}, 0.0, 0) == 0


def test_the_seed_readme_snippet_runs_as_written():
    """The seed README's memory snippet, with the user's own objects defined first."""
    snippet = '''
from chronos.continuum import ContinuumMemory

memory = ContinuumMemory()
# After each outer step
memory.store(outer_params, hypergradient, val_loss, step)

# When starting from new point
neighbors = memory.retrieve_similar(current_params, k=5)
predicted_grad = memory.predict_gradient(current_params)  # Warm-start!
'''
    env = {
        "outer_params": {"lr": torch.tensor(0.01), "wd": torch.tensor([1e-3, 2e-3])},
        "hypergradient": {"lr": torch.tensor(0.5), "wd": torch.tensor([0.1, -0.2])},
        "val_loss": 0.7,
        "step": 0,
        "current_params": {"lr": torch.tensor(0.02), "wd": torch.tensor([1e-3, 1e-3])},
    }
    exec(snippet, env)
    assert len(env["neighbors"]) == 1
    assert env["neighbors"][0].distance > 0
    torch.testing.assert_close(env["predicted_grad"]["wd"], torch.tensor([0.1, -0.2]))
