"""HeadQ: calibration, the logit identity, and the controls on a synthetic head with low-rank queries."""

import pytest
import torch

from atlas_core.kvquant import headq, metrics
from atlas_core.kvquant.headq import SideCode
from atlas_core.kvquant.quant import QuantSpec, dequantize, quantize
from atlas_core.models import load_model

D, R = 32, 4


def _head(seed=0):
    """Queries concentrated in a rank-R subspace (plus a little noise); random keys."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(D, R, generator=gen))[0]
    q = 3 * torch.randn(2, 200, R, generator=gen) @ basis.T + 0.05 * torch.randn(2, 200, D, generator=gen)
    k = torch.randn(1, 1, 64, D, generator=gen)  # (batch, kv_head, key, d_head)
    return q, k  # q: (head, point, d_head), both heads in KV group 0


def _kl(q, k, k_hat):
    return metrics.key_error_report(q[0, :20], k[0, 0], k_hat[0, 0])["kl"]


def test_query_covariance_and_basis():
    q, _ = _head()
    sigma = headq.query_covariance(q, torch.tensor([0, 0]), 1)
    manual = q.reshape(-1, D).double().T @ q.reshape(-1, D).double() / 400
    assert torch.allclose(sigma[0], manual)
    u = headq.top_eigenvectors(sigma, R)  # (kv_head, d_head, r)
    assert torch.allclose(u[0].T @ u[0], torch.eye(R), atol=1e-5)
    captured = (q.reshape(-1, D) @ u[0]).pow(2).sum() / q.pow(2).sum()
    assert captured > 0.99


def test_side_code_is_an_additive_logit_correction():
    q, k = _head()
    spec = QuantSpec(bits=2, group=32, axis="token")
    u = headq.top_eigenvectors(headq.query_covariance(q, torch.tensor([0, 0]), 1), R)
    side = SideCode(bases={0: u}, bits=4)
    k_hat = dequantize(quantize(k, spec), spec)
    codes = headq.encode_side(k, k_hat, u, side.spec())
    c_hat = dequantize(codes, side.spec())  # (batch, kv_head, key, r)
    additive = q[0] @ k_hat[0, 0].T + (q[0] @ u[0]) @ c_hat[0, 0].T  # q·k̂ + (U_rᵀq)·ĉ
    folded = q[0] @ headq.apply_side(k_hat, codes, u, side.spec())[0, 0].T  # q·(k̂ + U_r ĉ)
    assert torch.allclose(additive, folded, atol=1e-4)


def test_headq_beats_base_and_controls():
    q, k = _head()
    spec = QuantSpec(bits=2, group=32, axis="token")
    sigma = headq.query_covariance(q, torch.tensor([0, 0]), 1)
    u = headq.top_eigenvectors(sigma, R)
    base = dequantize(quantize(k, spec), spec)
    kl = {
        "base": _kl(q, k, base),
        "headq": _kl(q, k, headq.headq_keys(k, spec, SideCode(bases={0: u}), u)),
        "wrong-sign": _kl(q, k, headq.headq_keys(k, spec, SideCode(bases={0: u}, sign=-1.0), u)),
        "random": _kl(q, k, headq.headq_keys(k, spec, SideCode(bases={0: u}), headq.random_basis(1, D, R, seed=0))),
    }
    assert kl["headq"] < 0.1 * kl["base"]
    assert kl["wrong-sign"] > kl["base"]
    assert kl["headq"] < kl["random"]


def test_key_error_covariance_shape():
    k = torch.randn(2, 64, D, generator=torch.Generator().manual_seed(0))  # (kv_head, point, d_head)
    cov = headq.key_error_covariance(k, QuantSpec(bits=2, group=8, axis="channel"), seq_len=32)
    assert cov.shape == (2, D, D)
    assert torch.allclose(cov, cov.transpose(1, 2))


def test_calibrate_on_a_toy_model():
    lm = load_model("toy-llama")
    blocks = torch.randint(4, 260, (2, 32), generator=torch.Generator().manual_seed(0))
    spec = lm.spec
    for basis in ("query", "random", "key-pca"):  # the orthonormal ones (whitened: below)
        bases = headq.calibrate(lm, blocks, rank=3, basis=basis, key_spec=QuantSpec(bits=2, group=8, axis="channel"))
        assert sorted(bases) == list(range(spec.n_layers))
        for u in bases.values():
            assert u.shape == (spec.n_kv_heads, spec.d_head, 3)
            assert torch.allclose(u.transpose(1, 2) @ u, torch.eye(3).expand(spec.n_kv_heads, 3, 3), atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# The whitened reduced-rank basis: E = Σ_q^½ V_r, D = Σ_q^{-½} V_r, V_r the top eigenvectors of Σ_q^½ Σ_δ Σ_q^½.


def _spd(d, seed, decay):
    """A random SPD matrix with eigenvalues decay**i (i = 0 … d − 1)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0]
    return (w * decay ** torch.arange(d, dtype=torch.float64)) @ w.T


def _weighted_error(sigma_q, sigma_delta, enc, dec):
    """tr(Σ_q Σ_e) for the unquantized correction k̃ = k̂ + D Eᵀδ: e = (I − D Eᵀ) δ."""
    p = torch.eye(sigma_q.shape[-1], dtype=torch.float64) - dec.double() @ enc.double().T
    return torch.trace(sigma_q @ p @ sigma_delta @ p.T).item()


def test_whitened_bases_are_biorthogonal_and_exact_at_full_rank():
    sq, sd = _spd(D, 0, 0.7), _spd(D, 1, 0.9)
    for r in (1, R, D):
        enc, dec = headq.whitened_bases(sq, sd, r)
        assert enc.shape == dec.shape == (D, r)
        torch.testing.assert_close(enc.T @ dec, torch.eye(r), atol=1e-4, rtol=0)  # EᵀD = I_r
    enc, dec = headq.whitened_bases(sq, sd, D)
    assert _weighted_error(sq, sd, enc, dec) < 1e-6 * torch.trace(sq @ sd).item()  # r = d: the error is gone
    k = torch.randn(1, 1, 64, D, generator=torch.Generator().manual_seed(2))
    spec = QuantSpec(bits=2, group=D, axis="token")
    side = SideCode(bases={0: enc[None]}, decoders={0: dec[None]}, bits=8)
    exact = headq.headq_keys(k, spec, side, enc[None], dec[None])
    base = dequantize(quantize(k, spec), spec)
    weighted = lambda kt: torch.einsum("...i,ij,...j->", (kt - k).double(), sq, (kt - k).double()).item()  # noqa: E731
    assert weighted(exact) < 1e-3 * weighted(base)  # in the Σ_q metric only the 8-bit side code's rounding remains


def test_whitened_beats_the_query_basis_and_meets_the_brute_force_optimum():
    """Known Σ_q, Σ_δ whose top directions disagree: the whitened correction's tr(Σ_q Σ_e) is below the
    query basis's and equal to the best rank-r linear correction found by direct minimisation."""
    d, r = 4, 2
    sq, sd = _spd(d, 3, 0.5), torch.diag(torch.tensor([0.1, 0.2, 1.0, 3.0], dtype=torch.float64))
    enc, dec = headq.whitened_bases(sq, sd, r)
    whitened = _weighted_error(sq, sd, enc, dec)
    u = headq.top_eigenvectors(sq[None], r)[0]
    query = _weighted_error(sq, sd, u, u)
    assert whitened < 0.9 * query, (whitened, query)
    # brute force: minimise tr(Σ_q (I − A Bᵀ) Σ_δ (I − A Bᵀ)ᵀ) over A, B (d, r) from many random starts
    best = float("inf")
    for seed in range(8):
        gen = torch.Generator().manual_seed(seed)
        a = torch.randn(d, r, generator=gen, dtype=torch.float64, requires_grad=True)
        b = torch.randn(d, r, generator=gen, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([a, b], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14)

        def loss():
            opt.zero_grad()
            p = torch.eye(d, dtype=torch.float64) - a @ b.T
            value = torch.trace(sq @ p @ sd @ p.T)
            value.backward()
            return value

        opt.step(loss)
        best = min(best, loss().item())
    assert whitened <= best * (1 + 1e-6) + 1e-12, (whitened, best)  # never above the optimum
    assert best >= whitened * (1 - 1e-4)  # and the optimum is not below it: it is the optimum
    tail = torch.linalg.eigvalsh(torch.linalg.cholesky(sq).T @ sd @ torch.linalg.cholesky(sq))[: d - r].sum().item()
    assert abs(whitened - tail) < 1e-6 * tail  # Eckart–Young: the d − r smallest eigenvalues of Σ_q^½ Σ_δ Σ_q^½


def test_whitened_side_code_lowers_the_score_error_at_equal_storage():
    """Quantized side codes on synthetic keys whose base error is anisotropic: the whitened basis leaves less
    score-space error E[(q·(k̃ − k))²] than the query basis, in the same r codes per key."""
    q, _ = _head()
    gen = torch.Generator().manual_seed(4)
    k = torch.randn(1, 1, 512, D, generator=gen) * torch.linspace(0.2, 3.0, D)  # channel scales differ
    spec = QuantSpec(bits=2, group=8, axis="token")
    k_hat = dequantize(quantize(k, spec), spec)
    err = (k - k_hat)[0, 0].double()
    sq = headq.query_covariance(q, torch.tensor([0, 0]), 1)
    sd = (err.T @ err / len(err))[None]
    enc, dec = headq.whitened_bases(sq, sd, R)
    u = headq.top_eigenvectors(sq, R)
    score = lambda kt: (q[0].double() @ (kt - k)[0, 0].double().T).pow(2).mean().item()  # noqa: E731
    whitened_side = SideCode(bases={0: enc}, decoders={0: dec}, bits=4)
    query_side = SideCode(bases={0: u}, bits=4)
    whitened = score(headq.headq_keys(k, spec, whitened_side, enc, dec))
    query = score(headq.headq_keys(k, spec, query_side, u))
    assert whitened < query < score(k_hat), (whitened, query, score(k_hat))
    assert whitened_side.bits_per_element(D) == query_side.bits_per_element(D)  # the same r codes per key


def test_eigenvalue_floor_keeps_a_singular_query_covariance_finite():
    sq = torch.diag(torch.tensor([4.0, 1.0, 0.0, 0.0], dtype=torch.float64))  # queries never read channels 2, 3
    enc, dec = headq.whitened_bases(sq, torch.eye(4, dtype=torch.float64), 2)
    assert torch.isfinite(dec).all() and torch.isfinite(enc).all()
    torch.testing.assert_close(enc.T @ dec, torch.eye(2), atol=1e-4, rtol=0)
    assert enc[2:].abs().max() < 1e-6  # the correction spends nothing on directions queries never read
    for bad in (dict(r=0), dict(r=5), dict(r=2, floor=0.0)):
        with pytest.raises(ValueError):
            headq.whitened_bases(sq, torch.eye(4, dtype=torch.float64), **bad)


def test_side_code_decoders_must_match_the_bases():
    u = torch.linalg.qr(torch.randn(1, D, R))[0]
    assert SideCode(bases={0: u}).decoder(0) is u  # orthonormal: the basis decodes itself
    with pytest.raises(ValueError, match="decoders"):
        SideCode(bases={0: u}, decoders={1: u})
    with pytest.raises(ValueError, match="decoders"):
        SideCode(bases={0: u}, decoders={0: u[..., :2]})


def test_calibrate_side_whitened_on_a_toy_model():
    lm = load_model("toy-llama")
    blocks = torch.randint(4, 260, (2, 32), generator=torch.Generator().manual_seed(0))
    spec = QuantSpec(bits=2, group=8, axis="channel")
    enc, dec = headq.calibrate_side(lm, blocks, rank=3, basis="whitened", key_spec=spec)
    assert sorted(enc) == sorted(dec) == list(range(lm.spec.n_layers))
    for layer in enc:
        assert enc[layer].shape == dec[layer].shape == (lm.spec.n_kv_heads, lm.spec.d_head, 3)
        torch.testing.assert_close(enc[layer].transpose(1, 2) @ dec[layer], torch.eye(3).expand(lm.spec.n_kv_heads, 3, 3),
                                   atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="calibrate_side"):
        headq.calibrate(lm, blocks, rank=3, basis="whitened", key_spec=spec)
    with pytest.raises(ValueError, match="key_spec"):
        headq.calibrate_side(lm, blocks, rank=3, basis="whitened")


def test_whitened_onepass_equals_decode_and_holds_the_query_basis_bits():
    """headq --basis whitened through the one-pass engine and the step-by-step cache: the same NLL (to fp32
    noise) and the same bytes as the query basis (same r codes per key)."""
    from atlas_core.kvquant.decode import decode_nll
    from atlas_core.kvquant.experiment import KVMethod, side_code
    from atlas_core.kvquant.onepass import onepass_nll

    blocks = lambda seed, n, t: torch.randint(4, 260, (n, t), generator=torch.Generator().manual_seed(seed))  # noqa: E731
    ids, calib = blocks(0, 2, 48), blocks(1, 2, 32)
    for family in ("llama", "qwen2", "gemma3"):
        lm = load_model(f"toy-{family}")
        bits, nll = {}, {}
        for basis in ("whitened", "query"):
            method = KVMethod(method="headq", kbits=2, group=8, rank=4, basis=basis)
            side = side_code(lm, method, calib)
            assert (side.decoders is not None) == (basis == "whitened")
            ref, ref_bits = decode_nll(lm.model, ids, method.kv_config(), side, 16, 1)
            fast, fast_bits = onepass_nll(lm.model, ids, method.kv_config(), side, 16, 1)
            assert (fast - ref).abs().max().item() < 1e-4, family
            assert fast_bits == ref_bits
            bits[basis], nll[basis] = ref_bits, ref
        assert bits["whitened"] == bits["query"]
        assert (nll["whitened"] - nll["query"]).abs().max() > 1e-4  # a different correction, not the same one


def test_basis_flag_is_a_headq_variant():
    from atlas_core.kvquant.experiment import KVMethod

    whitened = KVMethod(method="headq", basis="whitened")
    assert "whitened" in whitened.label()
    assert whitened.baseline() == KVMethod(method="per-token")  # its baseline is the base quantizer alone
    assert whitened.canonical() != KVMethod(method="headq").canonical()  # memoised apart from the query basis
    for bad in (dict(method="headq", basis="whitened", control="key-pca"), dict(method="kivi", basis="whitened"),
                dict(method="headq", basis="nope")):
        with pytest.raises(ValueError, match="basis"):
            KVMethod(**bad)


def test_pre_rope_key_error_is_the_caches_own():
    """With the layer's RoPE tables, the calibration key error is what the cache's pre-RoPE store leaves
    (quantized before RoPE, compared after), and it differs from the post-RoPE quantizer's."""
    from atlas_core.extract import extract
    from atlas_core.kvquant import rope
    from atlas_core.kvquant.cache import _Store

    lm = load_model("toy-llama")
    blocks = torch.randint(4, 260, (2, 32), generator=torch.Generator().manual_seed(0))
    k = extract(lm, blocks, [0], fields=("k",), progress=False)[0].k  # (kv_head, point, d_head)
    cos_sin = rope.rotary_tables(lm.model)[0]
    spec = QuantSpec(bits=2, group=8, axis="channel")
    cov = headq.key_error_covariance(k, spec, 32, cos_sin)
    per_block = k.reshape(k.shape[0], 2, 32, -1).transpose(0, 1)  # (block, kv_head, token, d_head)
    errs = []
    for b in per_block:
        store = _Store(spec, rotary=cos_sin, memo=True)
        store.append(b[None])
        errs.append((store.seen() - b[None])[0].reshape(-1, k.shape[-1]).double())
    err = torch.cat(errs)  # head-major within each block: the same pairs, another order
    torch.testing.assert_close(cov.sum(0), err.T @ err / (len(err) / k.shape[0]), atol=1e-5, rtol=1e-4)
    assert (cov - headq.key_error_covariance(k, spec, 32)).abs().max() > 0.1 * cov.abs().max()  # not the same error


def test_whitened_pre_rope_onepass_equals_decode():
    from atlas_core.kvquant.decode import decode_nll
    from atlas_core.kvquant.experiment import KVMethod, side_code
    from atlas_core.kvquant.onepass import onepass_nll

    lm = load_model("toy-qwen2")
    ids = torch.randint(4, 260, (2, 48), generator=torch.Generator().manual_seed(0))
    calib = torch.randint(4, 260, (2, 32), generator=torch.Generator().manual_seed(1))
    method = KVMethod(method="headq", kbits=2, group=8, rank=4, basis="whitened", base="per-channel", pre_rope=True)
    side = side_code(lm, method, calib)
    (ref, ref_bits), (fast, fast_bits) = (f(lm.model, ids, method.kv_config(), side, 16, 1) for f in (decode_nll, onepass_nll))
    assert (fast - ref).abs().max().item() < 1e-4 and fast_bits == ref_bits
