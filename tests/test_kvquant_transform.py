"""Transform coding of keys (``atlas_core.kvquant.transform``): rotations, the loop reference, water-filling,
bit accounting, and the methods built on it (query-tc, hadamard, random-rotation, the lloyd-max grid) through
both engines and the CLI."""

import itertools
import math

import pytest
import torch

from atlas_core.book.cli import main
from atlas_core.kvquant import quant, transform as T
from atlas_core.kvquant.cache import KVQuantConfig, QuantizedKVCache, _Store
from atlas_core.kvquant.decode import decode_nll
from atlas_core.kvquant.experiment import KVMethod, transform_code
from atlas_core.kvquant.onepass import onepass_nll
from atlas_core.kvquant.quant import QuantSpec
from atlas_core.models import load_model
from atlas_core.toy import FAMILIES

H, D, G = 2, 16, 8  # KV heads, d_head, tokens per group


def _keys(seed: int, blocks: int = 3, tokens: int = 32) -> torch.Tensor:
    """Calibration-like keys (kv_head, block, token, d_head) with unequal channel scales and offsets."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(H, blocks, tokens, D, generator=gen) * torch.linspace(0.1, 3, D) + torch.linspace(-1, 1, D)


def _sigma(seed: int, zero_from: int | None = None) -> torch.Tensor:
    """A query covariance (kv_head, d, d); ``zero_from``: coordinates from there on get no query energy."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(H, D, D, generator=gen, dtype=torch.float64) * torch.linspace(2, 0.1, D, dtype=torch.float64)
    if zero_from is not None:
        a[..., zero_from:] = 0  # Σ_cc = Σ_i a_ic²: the last coordinates carry no query energy
    return a.transpose(-1, -2) @ a


def _code(rotation="identity", allocation="uniform", grid="uniform", bits=2, seed=0, sigma=None, keys=None) -> T.LayerCode:
    spec = T.TransformSpec(rotation=rotation, allocation=allocation, grid=grid, bits=bits, group=G, seed=seed)
    return T.calibrate_layer(spec, _keys(1) if keys is None else keys, _sigma(2) if sigma is None else sigma, H, D)


@pytest.mark.parametrize("kind", T.ROTATIONS)
def test_every_rotation_is_orthogonal(kind):
    r = T.rotations(kind, H, 64, seed=3, sigma=torch.cat([_sigma(2)] * 16, -1).repeat_interleave(4, -2)[..., :64, :64])
    if kind == "identity":
        assert r is None
        return
    eye = torch.eye(64).expand(H, 64, 64)
    assert torch.allclose(r.transpose(-1, -2) @ r, eye, atol=1e-5) and torch.allclose(r @ r.transpose(-1, -2), eye, atol=1e-5)
    if kind in ("hadamard", "random"):  # seeded: the same seed draws the same matrix, another seed another
        assert torch.equal(r, T.rotations(kind, H, 64, seed=3)) and not torch.equal(r, T.rotations(kind, H, 64, seed=4))
    if kind == "hadamard":  # every entry ±1/√d
        assert torch.allclose(r.abs(), torch.full_like(r, 1 / 8))


def test_hadamard_refuses_a_width_that_is_not_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        T.hadamard(48, 0)
    with pytest.raises(ValueError, match="power of two"):
        KVMethod(method="hadamard").check_head(48)


def test_query_rotation_is_the_covariance_eigenbasis_largest_first():
    sigma = _sigma(5)
    r = T.rotations("query", H, D, sigma=sigma).double()
    energy = torch.diagonal(r.transpose(-1, -2) @ sigma @ r, dim1=-2, dim2=-1)  # eigenvalues, descending
    assert torch.all(energy[:, :-1] >= energy[:, 1:] - 1e-6)
    off = r.transpose(-1, -2) @ sigma @ r - torch.diag_embed(energy)
    assert off.abs().max() < 1e-4 * energy.max()


@pytest.mark.parametrize("kind,grid", list(itertools.product(T.ROTATIONS, T.GRIDS)))
def test_round_trip_at_8_bits_is_within_one_quantization_step(kind, grid):
    code = _code(kind, grid=grid, bits=8)
    x = _keys(7, blocks=2, tokens=16).permute(1, 0, 2, 3)  # (batch, kv_head, key, d_head)
    x_hat = T.decode(T.encode(x, code), code)
    err = T.rotate(x_hat - x, code.rotation)  # per rotated coordinate
    y = T.rotate(x, code.rotation)
    span = y.unflatten(2, (-1, G)).amax(3) - y.unflatten(2, (-1, G)).amin(3)  # (batch, kv_head, key/g, d_head)
    step = (span / 255).repeat_interleave(G, 2)
    if grid == "static":  # raw levels: the widest gap, plus how far a value lies beyond the calibrated range (clipped)
        lv = code.levels  # (kv_head, d_head, 256), all 256 used at 8 bits
        gap = (lv[..., 1:] - lv[..., :-1]).amax(-1)[None, :, None, :]
        beyond = (y - lv[..., -1][None, :, None, :]).clamp(min=0) + (lv[..., 0][None, :, None, :] - y).clamp(min=0)
        step = gap + beyond
    elif grid != "uniform":  # learned levels: the widest gap between neighbouring levels sets the step
        gap = (code.levels[..., 1:] - code.levels[..., :-1]).amax(-1)  # (kv_head, d_head)
        step = span.repeat_interleave(G, 2) * gap[None, :, None, :]
    assert torch.all(err.abs() <= step + 2e-3 * y.abs().amax()), (err.abs() - step).max()
    if grid == "static":  # within the calibrated range the error is small; beyond it, clipped (bounded above)
        inside = beyond == 0
        assert inside.float().mean() > 0.5 and err.abs()[inside].mean() < 0.01 * y.abs().max()
        return
    assert (x_hat - x).abs().max() < 0.05 * x.abs().max()


@pytest.mark.parametrize("kind,grid,allocation", list(itertools.product(T.ROTATIONS, T.GRIDS, T.ALLOCATIONS)))
def test_vectorised_code_equals_the_per_coordinate_loop(kind, grid, allocation):
    code = _code(kind, allocation, grid, bits=2, sigma=_sigma(2, zero_from=12))
    if allocation == "waterfill" and (grid != "static" or kind in ("identity", "query")):
        # widths really differ (a random basis spreads the query energy: with no 32/g cost, even widths can win);
        # in a basis aligned with Σ_q, unseen coordinates get none
        assert code.bits.unique().numel() > 1, code.bits
        assert kind not in ("identity", "query") or (code.bits[:, 12:] == 0).all(), code.bits
    x = _keys(9, blocks=2, tokens=16).permute(1, 0, 2, 3)  # (batch, kv_head, key, d_head)
    q = T.encode(x, code)
    x_hat = T.decode(q, code)
    codes = T.unpack_codes(q.codes, code)  # (batch, key, column)
    for b in range(x.shape[0]):
        ref, ref_codes = T.roundtrip_ref(x[b], code)
        assert torch.allclose(x_hat[b], ref, atol=1e-5), (x_hat[b] - ref).abs().max()
        flat = torch.stack([c for head in ref_codes for c in head], -1)  # (key, column), head-major
        assert torch.equal(codes[b].long(), flat)


def test_packing_round_trips_every_width_mix():
    gen = torch.Generator().manual_seed(0)
    bits = torch.randint(0, 9, (3, 11), generator=gen)
    code = T.LayerCode(None, bits, torch.zeros(3, 11), None, "uniform", G)
    top = 2 ** code.column_bits()
    codes = (torch.rand(2, 5, len(code.columns), generator=gen) * top).long().to(torch.uint8)
    packed = T.pack_codes(codes, code)
    head_bits = bits.sum(1)
    assert packed.shape[-1] == sum(math.ceil(b / 8) for b in head_bits.tolist()) == code.bytes_per_token()
    assert torch.equal(T.unpack_codes(packed, code), codes)


def test_lloyd_max_equals_its_plain_reference_and_beats_the_uniform_grid():
    gen = torch.Generator().manual_seed(6)
    u = torch.rand(5, 400, generator=gen) ** 3  # skewed, as normalised key groups are
    u[:, :2] = torch.tensor([0.0, 1.0])  # every group holds its min and max
    for levels in (2, 4, 16):
        fast, ref = T.lloyd_max(u, levels), T.lloyd_max_ref(u, levels)
        assert torch.allclose(fast, ref, atol=1e-6), (fast - ref).abs().max()
        grid = torch.linspace(0, 1, levels).expand(5, -1)
        err = lambda lv: (u[..., None] - lv[:, None, :]).abs().min(-1).values.pow(2).mean()  # noqa: E731
        assert err(fast) < err(grid)
    pinned = T._lloyd_sorted(u.double().sort(-1).values.contiguous(), 8, pinned=True)
    assert torch.all(pinned[:, 0] == 0) and torch.all(pinned[:, -1] == 1) and torch.all(pinned.diff(dim=-1) >= 0)


def test_static_levels_are_lloyd_max_on_raw_values():
    """The static grid's levels: Lloyd-Max on the raw values (affine-equivariant: the reference on values mapped to
    [0, 1] and back), each level the mean of its cell, so the outer levels are the tails' conditional means."""
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(3, 500, generator=gen, dtype=torch.float64) ** 3 * 4 - 2  # heavy-tailed, offset
    pts = x.sort(-1).values.contiguous()
    lo, hi = pts[:, :1], pts[:, -1:]
    for n in (2, 4, 8):
        lv = T.static_levels(pts, n).double()
        unit = ((pts - lo) / (hi - lo))
        ref = T.lloyd_max_ref(unit, n, T.STATIC_ITERATIONS, init=T.quantile_init(unit, n)).double() * (hi - lo) + lo
        assert torch.allclose(lv, ref, atol=1e-4 * float((hi - lo).max())), (lv - ref).abs().max()
        cell = torch.searchsorted(((lv[:, 1:] + lv[:, :-1]) / 2).contiguous(), x.contiguous())
        for c in range(3):  # a fixed point with no dead level: every level the mean of the values nearest to it
            means = torch.stack([x[c][cell[c] == k].mean() for k in range(n)])
            assert torch.allclose(lv[c], means, atol=1e-3 * float(hi[c] - lo[c]))


def test_static_grid_is_exact_when_its_levels_are_the_data():
    """Keys whose rotated coordinates take at most 2^b values, calibrated on themselves: the code is lossless,
    and it holds only the code bits (no scale or zero)."""
    gen = torch.Generator().manual_seed(2)
    values = torch.randn(H, D, 4, generator=gen) * 3  # 4 distinct values per coordinate, equally often
    pick = torch.argsort(torch.rand(H, 2, 32, D, generator=gen), dim=2) % 4
    keys = torch.gather(values[:, None, None].expand(H, 2, 32, D, 4), -1, pick[..., None]).squeeze(-1)  # (H, block, token, D)
    spec = T.TransformSpec(rotation="identity", allocation="uniform", grid="static", bits=2, group=G)
    code = T.calibrate_layer(spec, keys, None, H, D)
    x = keys.permute(1, 0, 2, 3)  # (batch, kv_head, key, d_head)
    q = T.encode(x, code)
    assert torch.allclose(T.decode(q, code), x, rtol=1e-6, atol=1e-6)
    assert q.scale.numel() == 0 and q.zero.numel() == 0
    assert code.bits_per_element() == 2.0


def test_identity_uniform_equals_the_per_channel_quantizer():
    x = _keys(11, blocks=2, tokens=24).permute(1, 0, 2, 3)
    for bits in (2, 3, 4):
        code = _code("identity", bits=bits)
        spec = QuantSpec(bits=bits, group=G, axis="channel")
        assert torch.equal(T.decode(T.encode(x, code), code), quant.dequantize(quant.quantize(x, spec), spec))


# ---------------------------------------------------------------------------------------------------------------
# Water-filling.


def _convex_table(var: torch.Tensor) -> torch.Tensor:
    """D_c(b) = var_c · 4^{-b}, (d, 9): the high-rate distortion of a Gaussian coordinate (convex, decreasing)."""
    return var[:, None] * 4.0 ** -torch.arange(9, dtype=torch.float64)


def test_waterfill_spends_at_most_the_budget_and_nothing_where_queries_never_look():
    energy = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.0, 0.0, 3.0, 0.0])
    table = _convex_table(torch.tensor([1.0, 2.0, 0.5, 1.0, 9.0, 5.0, 1.0, 2.0], dtype=torch.float64))
    for budget, overhead in ((24.0, 1.0), (30.0, 2.0), (11.0, 0.5), (3.0, 1.0)):
        bits = T.waterfill(energy, table, budget, overhead)
        used = math.ceil(int(bits.sum()) / 8) * 8 + int((bits > 0).sum()) * overhead
        assert used <= budget and torch.all(bits[energy == 0] == 0), (budget, bits)
    assert int(T.waterfill(energy, table, 24.0, 1.0, byte=1).sum()) > 0


def _brute_force(energy, table, budget, overhead):
    cost = lambda b: sum(b) + overhead * sum(x > 0 for x in b)  # noqa: E731
    loss = lambda b: float(sum(energy[c] * table[c, b[c]] for c in range(len(b))))  # noqa: E731
    best = min((b for b in itertools.product(range(9), repeat=len(energy)) if cost(b) <= budget), key=loss)
    return loss, best


def test_waterfill_matches_the_brute_force_optimum_on_a_tiny_case():
    energy = torch.tensor([3.0, 1.0, 0.4, 0.1], dtype=torch.float64)
    table = _convex_table(torch.tensor([1.0, 2.0, 1.0, 3.0], dtype=torch.float64))
    overhead = 0.5
    for budget in (4.0, 6.5, 9.0, 12.0):
        greedy = T.waterfill(energy, table, budget, overhead, byte=1)
        loss, best = _brute_force(energy, table, budget, overhead)
        assert loss(greedy.tolist()) == pytest.approx(loss(best), rel=1e-12), (budget, greedy.tolist(), best)


def test_waterfill_starts_a_coordinate_whose_one_bit_code_is_worse_than_its_mean():
    """Min–max codes: 1 bit often does worse than the mean (D(1) > D(0)); the steepest multi-bit step still
    starts such a coordinate (the lower convex hull), where a one-bit-at-a-time greedy would never."""
    energy = torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64)
    table = _convex_table(torch.tensor([1.0, 1.0, 0.5], dtype=torch.float64))
    table[:, 1] = table[:, 0] * 1.5  # 1 bit worse than nothing
    for budget in (3.0, 7.5, 10.0):
        greedy = T.waterfill(energy, table, budget, 0.5, byte=1)
        loss, best = _brute_force(energy, table, budget, 0.5)
        assert (greedy != 1).all() and greedy.sum() > 0
        assert loss(greedy.tolist()) == pytest.approx(loss(best), rel=1e-12), (budget, greedy.tolist(), best)


def test_pooled_waterfill_pads_each_stream_and_spends_at_most_the_budget():
    gen = torch.Generator().manual_seed(4)
    energy = torch.rand(12, generator=gen, dtype=torch.float64) * torch.tensor([5.0] * 6 + [0.2] * 6, dtype=torch.float64)
    table = _convex_table(torch.rand(12, generator=gen, dtype=torch.float64) + 0.1)
    heads = torch.arange(2).repeat_interleave(6)
    for budget in (20.0, 33.0, 50.0):
        bits = T.waterfill(energy, table, budget, 1.0, heads=heads)
        used = sum(math.ceil(int(bits[heads == h].sum()) / 8) * 8 for h in range(2)) + int((bits > 0).sum())
        assert used <= budget, (budget, bits)
        assert bits[:6].sum() > bits[6:].sum()  # the head whose queries read more gets more of the bits


@pytest.mark.parametrize("grid", ["uniform", "static"])
def test_waterfill_spends_kivi_storage_by_default(grid):
    code = _code("query", "waterfill", grid, bits=2, sigma=_sigma(2))  # no zero-energy coordinate: the budget binds
    assert code.bits_per_element() <= 2 + 32 / G + 1e-12
    assert code.bits_per_element() > 2 + 32 / G - 8 / D  # at most a byte per head per token left unspent
    if grid == "static":  # no 32/g term: the whole budget is code bits
        assert int(code.bits.sum()) > (2 + 32 / G - 8 / D) * H * D - 1e-9


def test_static_grid_water_filling_has_no_per_group_cost():
    assert T.TransformSpec(grid="static", group=G).overhead() == 0.0
    assert T.TransformSpec(grid="uniform", group=G).overhead() == 32 / G
    energy = torch.tensor([4.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    table = _convex_table(torch.ones(4, dtype=torch.float64))
    spec = T.TransformSpec(grid="static", group=G, allocation="waterfill", bits=2)
    bits = T.waterfill(energy, table, 2.0 * 4, spec.overhead(), byte=1)  # 8 bits for 4 coordinates, nothing for stats
    assert int(bits.sum()) == 8


# ---------------------------------------------------------------------------------------------------------------
# Storage: the bytes held are the accounting formula.


@pytest.mark.parametrize("kind,allocation,grid", [("query", "waterfill", "uniform"), ("hadamard", "uniform", "uniform"),
                                                  ("identity", "uniform", "lloyd-max"), ("query", "waterfill", "static"),
                                                  ("identity", "uniform", "static")])
def test_bits_held_equal_the_accounting_formula(kind, allocation, grid):
    code = _code(kind, allocation, grid, bits=3)
    store = _Store(QuantSpec(bits=3, group=G, axis="channel"), code=code)
    x = _keys(13, blocks=2, tokens=32).permute(1, 0, 2, 3)  # (batch 2, kv_head, 32 keys, d_head)
    store.append(x[..., :16, :])
    store.append(x[..., 16:, :])
    held = 8 * store.held_bytes()["storage"] / x.numel()
    assert held == pytest.approx(code.bits_per_element(), rel=1e-12)
    assert torch.allclose(store.from_codes(), T.decode(T.encode(x, code), code), atol=1e-6)
    if grid == "static":  # no scale or zero bytes: code bytes only, Σ_head ⌈Σ_c b_c / 8⌉ per token
        assert held == pytest.approx(8 * sum(math.ceil(int(b) / 8) for b in code.bits.sum(1)) / (H * D), rel=1e-12)


def test_cache_bits_equal_the_formula_with_the_fp_window():
    lm = load_model("toy-llama")
    method = KVMethod(method="query-tc", kbits=2, group=G)
    code = transform_code(lm, method, _blocks(1, 2, 32))
    cache = QuantizedKVCache(lm.model.config, method.kv_config(code))
    ids = _blocks(0, 1, 44)
    lm.model(ids, past_key_values=cache, use_cache=True)
    n_q, n_fp = 40, 4  # KIVI's rule: keys flushed R = group at a time
    per_layer = [(c.bits_per_element() * n_q + 32 * n_fp) / (n_q + n_fp) for c in code.layers.values()]
    assert cache.bits_per_element()["key"] == pytest.approx(sum(per_layer) / len(per_layer), rel=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# The methods through both engines, and their settings.

PREFILL, TOKENS = 16, 48
NEW = {
    "query-tc K2": (KVMethod(method="query-tc", kbits=2, group=8), 1),
    "query-tc K3 V2 budget 4 chunk 3": (KVMethod(method="query-tc", kbits=3, vbits=2, group=8, budget=4.0), 3),
    "query-tc lloyd-max": (KVMethod(method="query-tc", kbits=2, group=8, grid="lloyd-max"), 1),
    "query-tc lloyd-max-pinned": (KVMethod(method="query-tc", kbits=2, group=8, grid="lloyd-max-pinned"), 1),
    "query-tc static": (KVMethod(method="query-tc", kbits=2, group=8, grid="static"), 1),
    "query-tc static chunk 3 V2": (KVMethod(method="query-tc", kbits=2, vbits=2, group=8, grid="static"), 3),
    "kivi static": (KVMethod(method="kivi", kbits=2, group=8, grid="static"), 1),
    "hadamard K2 V2": (KVMethod(method="hadamard", kbits=2, vbits=2, group=8), 1),
    "random-rotation K2 seed 3": (KVMethod(method="random-rotation", kbits=2, group=8, seed=3), 2),
    "kivi lloyd-max": (KVMethod(method="kivi", kbits=2, group=8, grid="lloyd-max"), 1),
    "per-channel lloyd-max R4": (KVMethod(method="per-channel", kbits=2, group=8, residual=4, grid="lloyd-max"), 1),
    "pre-RoPE hadamard": (KVMethod(method="hadamard", kbits=2, group=8, pre_rope=True), 1),
    "pre-RoPE query-tc V2": (KVMethod(method="query-tc", kbits=2, vbits=2, group=8, pre_rope=True), 1),
}
NO_PRE_ROPE = ("gpt2", "phi3")


def _blocks(seed: int, n: int = 2, tokens: int = TOKENS) -> torch.Tensor:
    return torch.randint(4, 260, (n, tokens), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def toys():
    return {family: load_model(f"toy-{family}") for family in FAMILIES}


@pytest.mark.parametrize("name", list(NEW))
def test_onepass_equals_decode_for_every_transform_method(toys, name):
    method, chunk = NEW[name]
    costs = {}
    for family, lm in toys.items():
        if method.pre_rope and family in NO_PRE_ROPE:
            continue
        code = transform_code(lm, method, _blocks(1, 2, 32))
        kv = method.kv_config(code)
        ref, ref_bits = decode_nll(lm.model, _blocks(0), kv, None, PREFILL, chunk)
        fast, fast_bits = onepass_nll(lm.model, _blocks(0), kv, None, PREFILL, chunk)
        fp, _ = decode_nll(lm.model, _blocks(0), None, prefill=PREFILL)
        assert fast_bits == ref_bits, f"{name} on {family}: bits {fast_bits} != {ref_bits}"
        gap = (fast - ref).abs().max().item()
        assert gap < 1e-4, f"{name} on {family}: one-pass vs decode {gap:.2e} nats"
        costs[family] = (ref - fp).abs().max().item()
        if method.budget is None and method.method in ("query-tc", "hadamard", "random-rotation"):  # equal storage
            kivi = KVMethod(method="kivi", kbits=method.kbits, vbits=method.vbits, group=method.group)
            _, kivi_bits = onepass_nll(lm.model, _blocks(0), kivi.kv_config(), None, PREFILL, chunk)
            assert fast_bits["key"] <= kivi_bits["key"] + 1e-12, (family, fast_bits, kivi_bits)
    assert max(costs.values()) > 1e-2, f"{name}: quantization changes nothing, the equality would be empty ({costs})"


def test_methods_settings_and_baselines():
    assert KVMethod(method="query-tc").baseline() == KVMethod(method="kivi")
    assert KVMethod(method="hadamard", grid="lloyd-max", seed=2).baseline() == KVMethod(method="kivi")
    assert KVMethod(method="kivi", grid="lloyd-max").baseline() == KVMethod(method="kivi")
    assert KVMethod(method="random-rotation", seed=5).canonical().seed == 5  # the seed draws the rotation
    assert KVMethod(method="query-tc").residual == 32 and KVMethod(method="query-tc").kv_config().residual_rule == "kivi"
    spec = KVMethod(method="query-tc", kbits=3, group=16, budget=3.5).transform_spec()
    assert (spec.rotation, spec.allocation, spec.total_budget()) == ("query", "waterfill", 3.5)
    assert KVMethod(method="kivi").transform_spec() is None and not KVMethod(method="hadamard").needs_calibration()
    for bad, word in ((dict(method="kivi", budget=3.0), "budget"), (dict(method="query-tc", budget=0.0), "budget"),
                      (dict(method="query-tc", budget=math.nan), "budget"), (dict(method="per-token", grid="lloyd-max"), "grid"),
                      (dict(method="headq", grid="lloyd-max"), "grid"), (dict(method="kivi", grid="nuq"), "grid")):
        with pytest.raises(ValueError, match=word):
            KVMethod(**bad)


def test_a_transform_method_needs_its_code(toys):
    from atlas_core.kvquant.experiment import evaluate

    lm = toys["llama"]
    with pytest.raises(ValueError, match="transform code"):
        evaluate(lm, _blocks(0), KVMethod(method="hadamard", group=8))
    with pytest.raises(ValueError, match="calibration"):
        transform_code(lm, KVMethod(method="query-tc", group=8), None)


@pytest.mark.parametrize("argv", [
    ["--method", "query-tc", "--budget", "0"],
    ["--method", "kivi", "--budget", "3"],
    ["--method", "per-token", "--grid", "lloyd-max"],
    ["--method", "query-tc", "--budget", "inf"],
])
def test_cli_refuses_bad_transform_settings_in_one_line(argv, capsys):
    status = main(["kvquant", "--model", "toy-llama", "--tokens", "128", "--seq-len", "64", "--prefill", "16", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and err[0].startswith("atlas: error: "), err


def test_cli_runs_query_tc_and_reports_the_bits_held(capsys):
    import json

    status = main(["kvquant", "--model", "toy-llama", "--method", "query-tc", "--tokens", "128", "--seq-len", "64",
                   "--prefill", "16", "--group", "16", "--calib-tokens", "128", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert status in (None, 0) and out["baseline"].startswith("kivi K2") and 0 < out["bits_key"] <= 32


def test_a_budget_above_what_8_bit_codes_hold_is_refused():
    from atlas_core.kvquant.experiment import KVMethod

    KVMethod(method="query-tc", budget=9.0)  # 8-bit codes + fp16 scale and zero per 32 tokens: exactly the ceiling
    with pytest.raises(ValueError, match="at most 9 bits per key element"):
        KVMethod(method="query-tc", budget=100.0)
    with pytest.raises(ValueError, match="at most 8 bits per key element"):
        KVMethod(method="query-tc", grid="static", budget=8.5)  # no scales: 8 bits at most
    with pytest.raises(ValueError, match="at most 10 bits"):
        KVMethod(method="query-tc", group=16, budget=10.5)
