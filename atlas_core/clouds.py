"""Per-head point clouds (ε, z or c) of a model's layers, sampled as the source protocol does, cached on disk.

One forward pass over the blocks extracts every requested layer; each (layer, residual) cloud is then
stored under a key that hashes the model's weights, the corpus, the block and sampling parameters and
the library cache version, so the atlas and cross-architecture chapters share one extraction.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import numpy as np
import torch

from atlas_core.cache import cache_dir, cache_key, read_checked, write_checked
from atlas_core.corpus import BlockSpec, token_blocks
from atlas_core.extract import extract, head_out_proj
from atlas_core.models import LoadedModel

RESIDUALS = ("eps", "z", "c")


@dataclass(frozen=True, kw_only=True)
class CloudSpec:
    """Which points: N per head from the first ``n_blocks`` blocks of ``seq_len`` tokens of a corpus.

    Position 0 of every block is left out: there z = v[0] exactly and ε = 0, a degenerate point.
    """

    corpus: str = "britannica"
    seq_len: int = 256
    n_blocks: int = 12
    n_points: int = 1200
    seed: int = 0

    def __post_init__(self):
        for name, low in (("seq_len", 2), ("n_blocks", 1), ("seed", 0)):  # the seed also draws the bootstrap
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer ≥ {low}, got {value!r}")
        available = self.n_blocks * (self.seq_len - 1)
        if self.n_points < 2 or self.n_points > available:
            raise ValueError(
                f"n_points={self.n_points} must be between 2 and the {available} points of "
                f"{self.n_blocks} blocks x {self.seq_len - 1} positions; raise n_blocks or lower n_points"
            )

    def block_spec(self) -> BlockSpec:
        """The held-out blocks the points come from (``head_clouds`` reads these; a pre-check can ask the
        corpus for them before a model loads, ``corpus.check_blocks``)."""
        return BlockSpec(corpus=self.corpus, seq_len=self.seq_len, n_blocks=self.n_blocks, split="eval")


def eligible_positions(spec: CloudSpec) -> np.ndarray:
    """Every (block, token) position a cloud may sample, as flat point indices, sorted: position 0 of each
    block left out; (n_blocks * (seq_len - 1),)."""
    positions = np.arange(spec.n_blocks * spec.seq_len)
    return positions[positions % spec.seq_len != 0]


def point_indices(spec: CloudSpec) -> np.ndarray:
    """The sampled (block, token) positions as flat point indices, sorted; (n_points,)."""
    rng = np.random.default_rng(spec.seed)
    return np.sort(rng.choice(eligible_positions(spec), size=spec.n_points, replace=False))


def subsample(full, spec: CloudSpec) -> np.ndarray:
    """The points ``spec`` samples, taken from a cloud that holds every eligible point of its blocks.

    One extraction at every eligible position then serves every sampling seed: for any seed the result
    equals ``head_clouds(lm, [layer], residual, spec)`` (``tests/test_clouds.py`` holds them equal).

    Args:
        full: (head, eligible, d) clouds at ``eligible_positions(spec)``, e.g. ``head_clouds`` with
            ``n_points = n_blocks * (seq_len - 1)`` and the same corpus, seq_len and n_blocks
        spec: the sample to take (its corpus, seq_len and n_blocks must be those of ``full``)
    Returns:
        (head, n_points, d)
    Raises:
        ValueError: ``full`` does not hold one point per eligible position of ``spec``'s blocks
    """
    every = eligible_positions(spec)  # sorted
    if np.ndim(full) != 3 or np.shape(full)[1] != len(every):
        raise ValueError(f"full must be (head, {len(every)}, d): every eligible point of {spec.n_blocks} blocks of "
                         f"{spec.seq_len} tokens; got shape {np.shape(full)}")
    return full[:, np.searchsorted(every, point_indices(spec))]


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of every parameter's name, shape and sum: changes whenever the weights do.

    Args:
        model: any module; its ``named_parameters`` are read, not changed.
    Returns:
        16 hex digits, the same on any thread count (the sums are taken on one thread, see below).
    """
    digest = hashlib.sha256()
    threads = torch.get_num_threads()
    # One thread: an fp32 sum split over several threads rounds differently, so a fingerprint taken on two
    # threads missed every cache a one-thread run had written (smollm2-135m: fa882ec4… on one, 585f15c1… on two).
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            for name, p in model.named_parameters():
                # fp32 sums: no float64 copy of the weights (that took seconds per call on 0.5B models)
                digest.update(f"{name}{tuple(p.shape)}{p.float().sum().item():.9g}".encode())
    finally:
        torch.set_num_threads(threads)
    return digest.hexdigest()[:16]


def head_clouds(
    lm: LoadedModel, layers: list[int], residual: str = "eps", spec: CloudSpec = CloudSpec(), progress: bool = True
) -> dict[int, np.ndarray]:
    """Clouds of every head in each layer, from the disk cache or one extraction pass.

    Args:
        lm: a loaded model.
        layers: layer indices (negative counts from the end).
        residual: "eps" (z − v[argmax p], the source's residual), "z" (head output before W_O) or
            "c" (after W_O, in the residual stream).
    Returns:
        {layer: (head, n_points, d)} float32, d = d_head (eps, z) or d_model (c).
    """
    if residual not in RESIDUALS:
        raise ValueError(f"unknown residual '{residual}'; choose one of {RESIDUALS}")
    n = lm.spec.n_layers
    if any(not -n <= l < n for l in layers):
        raise ValueError(f"layers {layers} out of range for a model with {n} layers")
    layers = sorted({l % n for l in layers})
    fingerprint = weights_fingerprint(lm.model)
    paths = {l: _cache_path(lm, fingerprint, spec, l, residual) for l in layers}
    clouds = {l: read_checked(p, _load_cloud, "cloud") for l, p in paths.items()}
    missing = [l for l, c in clouds.items() if c is None]
    if missing:
        clouds.update(_extract_into_cache(lm, missing, residual, spec, {l: paths[l] for l in missing}, progress))
    return {l: clouds[l] for l in layers}


def _load_cloud(path) -> np.ndarray:
    return np.load(path, allow_pickle=False)


def _save_cloud(cloud: np.ndarray, path) -> None:
    with open(path, "wb") as f:  # np.save on a path would append ".npy" to the temporary name
        np.save(f, cloud)


def kv_groups(lm: LoadedModel) -> np.ndarray:
    """(head,) the KV head each query head reads."""
    s = lm.spec
    return np.arange(s.n_heads) // (s.n_heads // s.n_kv_heads)


def out_proj(lm: LoadedModel, layer: int) -> np.ndarray:
    """(head, d_head, d_model) W_O of a layer split per head."""
    return head_out_proj(lm.model, layer % lm.spec.n_layers)[0].detach().numpy()


def _cache_path(lm, fingerprint, spec, layer, residual):
    key = cache_key(model=lm.spec.name, weights=fingerprint, add_bos=lm.spec.add_bos, layer=layer,
                    residual=residual, **asdict(spec))
    return cache_dir("clouds") / f"{lm.spec.name.replace('/', '--')}-L{layer}-{residual}-{key}.npy"


def _extract_into_cache(lm, layers, residual, spec, paths, progress):
    blocks = token_blocks(lm, spec.block_spec())
    acts = extract(lm, blocks, layers, fields=(residual,), progress=progress)
    index = torch.from_numpy(point_indices(spec))
    clouds = {}
    for layer in layers:
        cloud = getattr(acts[layer], residual)[:, index].float().numpy()  # (head, n_points, d)
        if not np.isfinite(cloud).all():
            raise FloatingPointError(f"non-finite values in layer {layer} {residual}; check the model's weights")
        write_checked(paths[layer], lambda tmp, cloud=cloud: _save_cloud(cloud, tmp))
        clouds[layer] = cloud
    return clouds
