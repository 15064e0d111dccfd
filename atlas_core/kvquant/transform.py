"""Transform coding of cached keys: an orthogonal rotation, per-coordinate bit widths, per-channel groups.

Per layer and KV head, a key k (d_head,) is rotated to y = Rᵀk (R orthogonal, d_head × d_head); each
coordinate c of y is quantized per channel over groups of ``group`` consecutive tokens (KIVI's key
grouping: one fp16 scale and zero per (group of tokens, coordinate)) with its own width b_c ∈ {0 … 8}.
A coordinate with b_c = 0 stores nothing per token and is reconstructed as its calibration mean μ_c
(held once per layer). Decode: k̂ = R ŷ.

Rotations (``ROTATIONS``), all exactly orthogonal:

- "identity": plain per-channel quantization (KIVI's key quantizer);
- "hadamard": the normalised Walsh–Hadamard matrix with seeded random ±1 signs, R = diag(s)·H/√d
  (QuaRot, Ashkboos et al. 2024; SpinQuant, Liu et al. 2024); d_head a power of two;
- "random": a seeded Haar-random orthogonal matrix (QR of a Gaussian, signs fixed by diag(R) > 0;
  Mezzadri 2007), as TurboQuant (Zandieh et al. 2025) rotates before quantizing;
- "query": per KV head the eigenbasis of the calibration query covariance Σ_q, largest eigenvalue first.

Grids (``GRIDS``): "uniform" (asymmetric min–max, exactly ``quant.quantize`` per channel), "lloyd-max"
(each group is min–max normalised to [0, 1], stored as fp16 zero = min and range = max − min, and each
value is rounded to the nearest of 2^b levels learned per layer-coordinate by 1-D Lloyd-Max / k-means on
the normalised calibration values: KVQuant's non-uniform "nuq" datatype, Hooper et al. 2024; levels held
once per layer), or "lloyd-max-pinned" (the same with the end levels fixed at 0 and 1, so each group's min
and max are reproduced exactly as on the uniform grid: Lloyd-Max pulls the extreme levels inward, and on
smollm2-135m KIVI-2 with plain lloyd-max keys does worse than on the uniform grid), or "static" (no per-group
statistics at all: each coordinate is rounded to the nearest of 2^b levels learned per layer-coordinate by
1-D Lloyd-Max on the calibration values themselves, not normalised per group; values beyond the calibrated
range take the outer level, itself the conditional mean of its tail cell. KVQuant calibrates its key
scaling offline, Hooper et al. 2024 §3.3; the static grid drops the per-group scale and zero, 32/group bits
per stored coordinate, so every stored bit is a code bit and water-filling spends them so).

Bit allocation (``ALLOCATIONS``): "uniform" (every coordinate the same ``bits``) or "waterfill" (``waterfill``:
reverse water-filling on the query energy, greedy marginal allocation under the storage budget), by default
over all coordinates of a layer's KV heads at once (``pool="layer"``: their logit errors add, so a head
whose queries read more gets more of the layer's bits; the layer's total storage is the budget's), or per
KV head (``pool="head"``).

Storage is real: per token and KV head the codes of all coordinates with b_c > 0 are one bit stream of
Σ_c b_c bits (coordinates in order, each code most significant bit first) padded to whole bytes and packed
with ``quant.pack`` (1-bit planes); the heads' streams sit side by side, so a token holds
B = Σ_head ⌈Σ_c b_c / 8⌉ bytes, and the fp16 scales and zeros exist only for coordinates with b_c > 0.
``LayerCode.bits_per_element`` is the accounting formula; a cache's ``bits_per_element`` counts the same
tensors' bytes (tests hold the two equal).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from atlas_core.kvquant import quant
from atlas_core.kvquant.quant import OVERHEAD_BITS, QTensor

ROTATIONS = ("identity", "hadamard", "random", "query")
ALLOCATIONS = ("uniform", "waterfill")
GRIDS = ("uniform", "lloyd-max", "lloyd-max-pinned", "static")
POOLS = ("head", "layer")
MAX_BITS = 8  # codes are uint8
LLOYD_ITERATIONS = 30
STATIC_ITERATIONS = 100  # the static grid's Lloyd-Max on raw values: heavier tails, slower convergence from the uniform start


@dataclass(frozen=True, kw_only=True)
class TransformSpec:
    """How a transform code is built: rotation, bit allocation, grid, and the storage it may use.

    ``budget``: stored bits per key element (codes + fp16 scales and zeros) that "waterfill" may spend;
    None: ``bits + 32/group``, exactly the storage of per-channel ``bits``-bit keys. Raises ValueError for
    an unknown rotation, allocation or grid, bits outside 1..8, a group < 1, or a budget that is not a
    positive finite number or is given to the uniform allocation.
    """

    rotation: str = "query"
    allocation: str = "waterfill"
    grid: str = "uniform"
    bits: int = 2
    group: int = 32
    budget: float | None = None
    seed: int = 0  # the hadamard signs and the random rotation
    pool: str = "layer"  # waterfill: one budget shared by a layer's KV heads ("layer") or one per KV head ("head")
    scale_dtype: torch.dtype = torch.float16

    def __post_init__(self):
        for name, allowed in (("rotation", ROTATIONS), ("allocation", ALLOCATIONS), ("grid", GRIDS), ("pool", POOLS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        quant.check_bits(self.bits)
        if isinstance(self.group, bool) or not isinstance(self.group, int) or self.group < 1:
            raise ValueError(f"group must be a positive integer, got {self.group!r}")
        if self.budget is not None:
            if self.allocation != "waterfill":
                raise ValueError("a bit budget applies to the waterfill allocation only")
            check_budget(self.budget)
            if self.budget > self.most_bits():
                raise ValueError(f"budget {self.budget:g} is more than {self.grid}-grid codes can hold: at most "
                                 f"{self.most_bits():g} bits per key element (8-bit codes"
                                 f"{'' if self.grid == 'static' else f' with their scales and zeros, group {self.group}'})")

    def most_bits(self) -> float:
        """The most bits per key element any allocation can spend: 8-bit codes, plus the fp16 scale and zero of
        each group of ``group`` tokens unless the grid is static."""
        return quant.BITS.stop - 1 + (0.0 if self.grid == "static" else 2 * OVERHEAD_BITS / self.group)

    def total_budget(self) -> float:
        """Bits per key element the allocation may spend (codes + scales + zeros); by default per-channel
        ``bits``' storage (``bits + 32/group``), whatever the grid (the static grid spends it all on codes)."""
        return self.budget if self.budget is not None else self.bits + 2 * OVERHEAD_BITS / self.group

    def overhead(self) -> float:
        """Scale + zero bits per token of a stored coordinate: 32/group, none on the static grid."""
        return grid_overhead(self.grid, self.group)

    def needs_calibration(self) -> bool:
        """Whether calibration keys or queries are needed (a query basis, water-filling or learned levels)."""
        return self.rotation == "query" or self.allocation == "waterfill" or self.grid != "uniform"


def grid_overhead(grid: str, group: int) -> float:
    """Per-group statistics in bits per token of a stored coordinate: fp16 scale + zero over ``group`` tokens
    (32/group), 0 for the static grid (its levels are held once per layer)."""
    return 0.0 if grid == "static" else 2 * OVERHEAD_BITS / group


def check_budget(budget) -> None:
    """Raise ValueError unless ``budget`` (bits per key element) is a positive finite number."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget <= 0:
        raise ValueError(f"budget (bits per key element) must be a positive finite number, got {budget!r}")


# ----------------------------------------------------------------------------------------------------------------
# Rotations.


def hadamard(d: int, seed: int) -> torch.Tensor:
    """diag(s)·H_d/√d with seeded random signs s ∈ {±1}^d, (d, d) float64; H_d by Sylvester's construction.

    Raises:
        ValueError: d is not a power of two.
    """
    if d < 1 or d & (d - 1):
        raise ValueError(f"the Hadamard rotation needs d_head a power of two, got {d}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (d,), generator=gen).double() * 2 - 1
    return signs[:, None] * h / math.sqrt(d)


def haar(d: int, seed: int) -> torch.Tensor:
    """A Haar-random orthogonal (d, d) float64 matrix: QR of a Gaussian, column signs fixed so diag(R) > 0."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def eigenbasis(sigma: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of symmetric (..., d, d) as columns, largest eigenvalue first, float64."""
    _, vecs = torch.linalg.eigh(sigma.double())  # ascending
    return vecs.flip(-1)


def rotations(kind: str, n_kv: int, d: int, seed: int = 0, sigma: torch.Tensor | None = None) -> torch.Tensor | None:
    """Per-KV-head rotations (kv_head, d_head, d_head) float32 (columns: the new coordinates), None for identity.

    Args:
        kind: one of ``ROTATIONS``; sigma: Σ_q (kv_head, d_head, d_head), needed by "query".
        seed: hadamard signs and random rotations; KV head h uses seed + h (each head its own draw).
    Raises:
        ValueError: an unknown kind, "query" without Σ_q, "hadamard" with d_head not a power of two.
    """
    if kind == "identity":
        return None
    if kind == "hadamard":
        return torch.stack([hadamard(d, seed + h) for h in range(n_kv)]).float()
    if kind == "random":
        return torch.stack([haar(d, seed + h) for h in range(n_kv)]).float()
    if kind == "query":
        if sigma is None:
            raise ValueError("the query rotation needs the calibration query covariance Σ_q")
        return eigenbasis(sigma).float()
    raise ValueError(f"rotation must be one of {ROTATIONS}, got {kind!r}")


def rotate(x: torch.Tensor, rotation: torch.Tensor | None) -> torch.Tensor:
    """y = Rᵀk for keys x (batch, kv_head, key, d_head) and R (kv_head, d_head, d_head); identity if None."""
    return x if rotation is None else torch.einsum("bhtd,hde->bhte", x, rotation.to(x.dtype))


def unrotate(y: torch.Tensor, rotation: torch.Tensor | None) -> torch.Tensor:
    """k = R y, the inverse of ``rotate`` (R orthogonal)."""
    return y if rotation is None else torch.einsum("bhte,hde->bhtd", y, rotation.to(y.dtype))


# ----------------------------------------------------------------------------------------------------------------
# Per-channel quantization with a width per column.


def quantize_columns(y: torch.Tensor, bits: torch.Tensor, grid: str, levels: torch.Tensor | None, group: int,
                     scale_dtype: torch.dtype = torch.float16) -> QTensor:
    """Quantize columns of y (..., key, column) per channel over groups of ``group`` tokens.

    Args:
        bits: (column,) widths 1..8; levels: (column, 256) Lloyd-Max levels (the first 2^b used), in [0, 1]
            for the lloyd-max grids, in the values' own units for the static grid.
    Returns:
        ``QTensor``: codes uint8 (..., key, column), scale and zero (..., key/group, column) in ``scale_dtype``.
        Uniform: scale = (max − min)/(2^b − 1), as ``quant.quantize``; lloyd-max: scale = max − min;
        static: no statistics, scale and zero (..., key/group, 0).
    """
    *lead, n_key, n_col = y.shape
    if n_key % group:
        raise ValueError(f"per-channel quantization needs a multiple of {group} tokens, got {n_key}")
    if grid == "static":
        none = torch.zeros(*lead, n_key // group, 0, dtype=scale_dtype, device=y.device)
        return QTensor(nearest_level(y, levels, bits).to(torch.uint8), none, none.clone())
    g = y.reshape(*lead, n_key // group, group, n_col)  # (..., key/g, g, column)
    lo, hi = g.amin(-2, keepdim=True), g.amax(-2, keepdim=True)  # (..., key/g, 1, column)
    zero = lo.to(scale_dtype)
    top = (2 ** bits.to(g.device) - 1).to(g.dtype)  # (column,) highest code
    if grid == "uniform":
        scale = ((hi - zero.float()) / top).to(scale_dtype)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = torch.round((g - zero.float()) / scale.float()).clamp_(torch.zeros_like(top), top)
    else:
        scale = (hi - zero.float()).to(scale_dtype)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = nearest_level((g - zero.float()) / scale.float(), levels, bits)
    codes = codes.to(torch.uint8).reshape(*lead, n_key, n_col)
    return QTensor(codes, scale.squeeze(-2), zero.squeeze(-2))


def nearest_level(u: torch.Tensor, levels: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of each column's 2^b sorted levels, u (..., column), levels (column, 256) -> long."""
    n_col = u.shape[-1]
    mids = (levels[:, 1:] + levels[:, :-1]) / 2  # (column, 255) decision thresholds
    used = torch.arange(1, levels.shape[1], device=u.device) < (2 ** bits.to(u.device))[:, None]  # (column, 255)
    mids = torch.where(used, mids, torch.full_like(mids, math.inf))
    flat = u.reshape(-1, n_col).T.contiguous()  # (column, point)
    idx = torch.searchsorted(mids.to(flat.dtype).contiguous(), flat)  # (column, point)
    return idx.T.reshape(u.shape)


def dequantize_columns(q: QTensor, grid: str, levels: torch.Tensor | None, group: int, dtype=torch.float32) -> torch.Tensor:
    """Inverse of ``quantize_columns``: (..., key, column) in ``dtype``."""
    *lead, n_key, n_col = q.codes.shape
    if grid == "static":
        return levels.to(q.codes.device, dtype)[torch.arange(n_col, device=q.codes.device), q.codes.long()]
    scale = q.scale.to(dtype).repeat_interleave(group, dim=-2)  # (..., key, column)
    zero = q.zero.to(dtype).repeat_interleave(group, dim=-2)
    if grid == "uniform":
        return q.codes.to(dtype) * scale + zero
    level = levels.to(dtype)[torch.arange(n_col, device=q.codes.device), q.codes.long()]  # (..., key, column)
    return level * scale + zero


def lloyd_max(u: torch.Tensor, n_levels: int, iterations: int = LLOYD_ITERATIONS) -> torch.Tensor:
    """1-D Lloyd-Max (k-means) levels per column of u (column, point) in [0, 1] -> (column, n_levels), sorted.

    Starts from the uniform grid k/(n_levels − 1); an empty cell keeps its level (Lloyd 1982; Max 1960).
    Each point belongs to the cell of the nearest level (ties to the lower, as ``nearest_level``); the cells'
    sums come from prefix sums of the sorted points, so an iteration costs O(levels · log points) per column
    (``lloyd_max_ref`` assigns every point instead).
    """
    return _lloyd_sorted(u.double().sort(-1).values.contiguous(), n_levels, iterations)


def _lloyd_sorted(points: torch.Tensor, n_levels: int, iterations: int = LLOYD_ITERATIONS, pinned: bool = False,
                  init: torch.Tensor | None = None) -> torch.Tensor:
    """``lloyd_max`` on points already sorted along the last axis, (column, point) float64 contiguous.

    ``pinned``: the end levels stay at 0 and 1 (each group's min and max reproduced exactly, as the uniform
    grid does); only the inner levels move. ``init``: (column, n_levels) starting levels, sorted; None: the
    uniform grid on [0, 1].
    """
    n_col, n = points.shape
    levels = torch.linspace(0, 1, n_levels, dtype=torch.float64).expand(n_col, -1).clone() if init is None else init.double().clone()
    prefix = torch.nn.functional.pad(points.cumsum(-1), (1, 0))  # (column, point + 1), a leading 0
    ends = torch.full((n_col, 1), n, dtype=torch.long)
    for _ in range(iterations):
        mids = ((levels[:, 1:] + levels[:, :-1]) / 2).contiguous()
        edges = torch.cat([torch.zeros_like(ends), torch.searchsorted(points, mids, right=True), ends], -1)  # (column, L + 1)
        count = (edges[:, 1:] - edges[:, :-1]).double()
        total = prefix.gather(1, edges[:, 1:]) - prefix.gather(1, edges[:, :-1])
        levels = torch.where(count > 0, total / count.clamp(min=1), levels).sort(-1).values
        if pinned:
            levels[:, 0], levels[:, -1] = 0.0, 1.0
    return levels.float()


def lloyd_max_ref(u: torch.Tensor, n_levels: int, iterations: int = LLOYD_ITERATIONS, init: torch.Tensor | None = None) -> torch.Tensor:
    """Plain reference of ``lloyd_max``: every point assigned to its nearest level, cells averaged (``init``: as
    ``_lloyd_sorted``)."""
    n_col = u.shape[0]
    levels = torch.linspace(0, 1, n_levels, dtype=torch.float64).expand(n_col, -1).clone() if init is None else init.double().clone()
    u = u.double()
    for _ in range(iterations):
        mids = ((levels[:, 1:] + levels[:, :-1]) / 2).contiguous()
        cell = torch.searchsorted(mids, u.contiguous())  # (column, point)
        total = torch.zeros_like(levels).scatter_add_(1, cell, u)
        count = torch.zeros_like(levels).scatter_add_(1, cell, torch.ones_like(u))
        levels = torch.where(count > 0, total / count.clamp(min=1), levels).sort(-1).values
    return levels.float()


# ----------------------------------------------------------------------------------------------------------------
# One layer's code.


@dataclass(frozen=True, eq=False)
class LayerCode:
    """One layer's transform code: rotations, widths, calibration means and grid levels.

    Fields (kv_head = H, d_head = d):
        rotation: (H, d, d) float32 or None (identity); bits: (H, d) long in 0..8; mean: (H, d) float32 μ_c;
        levels: (H, d, 256) float32 Lloyd-Max levels, in [0, 1] (the lloyd-max grids) or in the rotated
        coordinates' units (static), else None.
    """

    rotation: torch.Tensor | None
    bits: torch.Tensor
    mean: torch.Tensor
    levels: torch.Tensor | None
    grid: str
    group: int
    scale_dtype: torch.dtype = torch.float16
    columns: torch.Tensor = field(init=False)  # (column,) flat H·d index of coordinates with b_c > 0
    planes: torch.Tensor = field(init=False)  # (8·B,) where each stored bit comes from (see ``pack_codes``)

    def __post_init__(self):
        if self.grid not in GRIDS:
            raise ValueError(f"grid must be one of {GRIDS}, got {self.grid!r}")
        if int(self.bits.min()) < 0 or int(self.bits.max()) > MAX_BITS:
            raise ValueError(f"bit widths must be in 0..{MAX_BITS}")
        if self.grid != "uniform" and self.levels is None:
            raise ValueError("the lloyd-max grid needs its levels")
        flat = self.bits.reshape(-1)
        columns = torch.nonzero(flat > 0).squeeze(-1)  # head-major, coordinate order
        object.__setattr__(self, "columns", columns)
        object.__setattr__(self, "planes", _plane_sources(self.bits))

    @property
    def n_kv(self) -> int:
        return self.bits.shape[0]

    @property
    def d(self) -> int:
        return self.bits.shape[1]

    def column_bits(self) -> torch.Tensor:
        """(column,) widths of the stored coordinates."""
        return self.bits.reshape(-1)[self.columns]

    def column_levels(self) -> torch.Tensor | None:
        """(column, 256) levels of the stored coordinates (lloyd-max), else None."""
        return None if self.levels is None else self.levels.reshape(-1, self.levels.shape[-1])[self.columns]

    def bytes_per_token(self) -> int:
        """Code bytes a token holds: Σ over KV heads of ⌈Σ_c b_c / 8⌉."""
        return len(self.planes) // 8

    def bits_per_element(self) -> float:
        """The accounting formula: stored bits per key element, (8·B + (columns)·32/group) / (H·d); the static
        grid holds no per-group statistics: 8·B / (H·d)."""
        return (8 * self.bytes_per_token() + len(self.columns) * grid_overhead(self.grid, self.group)) / (self.n_kv * self.d)


def _plane_sources(bits: torch.Tensor) -> torch.Tensor:
    """Where each stored bit comes from: an index into the columns' 8 bit planes (MSB first), or the pad slot.

    The stored columns' codes, expanded to planes (column, 8) and flattened, give 8·C plane bits; column n
    contributes its last b_n planes (its b_n low bits, MSB first). Each KV head's bits are padded to whole
    bytes with slot 8·C (a zero). Returns (8·B,) long.
    """
    n_col = int((bits > 0).sum())
    out, n = [], 0
    for head in bits.tolist():
        stream = []
        for b in head:
            if b:
                stream += [8 * n + p for p in range(8 - b, 8)]
                n += 1
        out += stream + [8 * n_col] * (-len(stream) % 8)
    return torch.tensor(out, dtype=torch.long)


_SHIFTS = torch.arange(7, -1, -1, dtype=torch.uint8)  # plane p holds bit 7 − p


def pack_codes(codes: torch.Tensor, code: LayerCode) -> torch.Tensor:
    """Codes (..., key, column) uint8 -> packed bytes (..., key, B): each head's widths as one bit stream."""
    shifts = _SHIFTS.to(codes.device)
    planes = ((codes.unsqueeze(-1) >> shifts) & 1).flatten(-2)  # (..., key, 8·column)
    planes = torch.cat([planes, torch.zeros_like(planes[..., :1])], dim=-1)  # the pad slot
    return quant.pack(planes[..., code.planes.to(codes.device)], 1)


def unpack_codes(packed: torch.Tensor, code: LayerCode) -> torch.Tensor:
    """Inverse of ``pack_codes``: (..., key, B) -> (..., key, column) uint8."""
    n_col = len(code.columns)
    stream = quant.unpack(packed, 1, len(code.planes))  # (..., key, 8·B)
    planes = torch.zeros(*packed.shape[:-1], 8 * n_col + 1, dtype=torch.uint8, device=packed.device)
    planes[..., code.planes.to(packed.device)] = stream  # pad bits are 0 and land in the pad slot
    planes = planes[..., :-1].unflatten(-1, (n_col, 8))  # (..., key, column, 8)
    return (planes << _SHIFTS.to(packed.device)).sum(-1, dtype=torch.uint8)


def _to_columns(y: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """(batch, kv_head, key, d_head) -> the stored columns (batch, key, column)."""
    b, h, t, d = y.shape
    return y.permute(0, 2, 1, 3).reshape(b, t, h * d)[..., columns.to(y.device)]


def encode(x: torch.Tensor, code: LayerCode) -> QTensor:
    """Keys x (batch, kv_head, key, d_head), key a multiple of the group -> packed storage.

    Returns:
        ``QTensor``: codes uint8 (batch, key, B) packed, scale and zero (batch, key/group, column).
    """
    y = _to_columns(rotate(x, code.rotation), code.columns)  # (batch, key, column)
    q = quantize_columns(y, code.column_bits(), code.grid, code.column_levels(), code.group, code.scale_dtype)
    return QTensor(pack_codes(q.codes, code), q.scale, q.zero)


def decode(q: QTensor, code: LayerCode, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of ``encode``: k̂ = R ŷ, (batch, kv_head, key, d_head), ŷ_c = μ_c where b_c = 0."""
    codes = unpack_codes(q.codes, code)  # (batch, key, column)
    y_cols = dequantize_columns(QTensor(codes, q.scale, q.zero), code.grid, code.column_levels(), code.group, dtype)
    b, t = codes.shape[:2]
    y = code.mean.to(dtype).reshape(-1).expand(b, t, -1).clone()  # (batch, key, H·d)
    y[..., code.columns.to(y.device)] = y_cols
    y = y.view(b, t, code.n_kv, code.d).permute(0, 2, 1, 3)  # (batch, kv_head, key, d_head)
    return unrotate(y, code.rotation)


# ----------------------------------------------------------------------------------------------------------------
# Reference: one coordinate and one group at a time (slow; for tests).


def roundtrip_ref(x: torch.Tensor, code: LayerCode) -> tuple[torch.Tensor, list]:
    """Plain loop reference of ``decode(encode(x))`` for keys x (kv_head, key, d_head).

    Returns:
        (k̂ (kv_head, key, d_head), codes: [per KV head, per coordinate with b_c > 0, the (key,) long codes]).
    """
    n_kv, n_key, d = x.shape
    out, all_codes = torch.zeros(n_kv, n_key, d), []
    for h in range(n_kv):
        rot = torch.eye(d) if code.rotation is None else code.rotation[h]
        y = x[h] @ rot  # (key, d_head): y_t = Rᵀ k_t
        y_hat = torch.zeros(n_key, d)
        head_codes = []
        for c in range(d):
            b = int(code.bits[h, c])
            if b == 0:
                y_hat[:, c] = code.mean[h, c]
                continue
            codes = torch.zeros(n_key, dtype=torch.long)
            if code.grid == "static":  # no groups: the nearest of the coordinate's own levels
                grid = code.levels[h, c, : 2**b]
                thresholds = (grid[1:] + grid[:-1]) / 2  # a value above k thresholds is nearest level k
                for i, v in enumerate(y[:, c]):
                    codes[i] = int((thresholds < v).sum())  # ties: the lower (of repeated levels: the last)
                    y_hat[i, c] = grid[codes[i]]
                head_codes.append(codes)
                continue
            for s in range(0, n_key, code.group):
                values = y[s : s + code.group, c]
                zero = values.min().to(code.scale_dtype)
                if code.grid == "uniform":
                    scale = ((values.max() - zero.float()) / (2**b - 1)).to(code.scale_dtype)
                else:
                    scale = (values.max() - zero.float()).to(code.scale_dtype)
                scale = scale if scale > 0 else torch.ones((), dtype=code.scale_dtype)
                for i, v in enumerate(values):
                    if code.grid == "uniform":
                        k = int(torch.round((v - zero.float()) / scale.float()).clamp(0, 2**b - 1))
                        level = float(k)
                    else:
                        u = (v - zero.float()) / scale.float()
                        grid = code.levels[h, c, : 2**b]
                        k = int(torch.argmin((grid - u).abs()))  # nearest level (ties: the lower)
                        level = float(grid[k])
                    codes[s + i] = k
                    y_hat[s + i, c] = level * scale.float() + zero.float()
            head_codes.append(codes)
        all_codes.append(head_codes)
        out[h] = y_hat @ rot.T
    return out, all_codes


# ----------------------------------------------------------------------------------------------------------------
# Calibration: distortion per width, reverse water-filling, levels.


def waterfill(energy: torch.Tensor, distortion: torch.Tensor, budget: float, overhead: float, byte: int = 8,
              heads: torch.Tensor | None = None) -> torch.Tensor:
    """Integer widths b_c minimising Σ_c λ_c D_c(b_c) under the storage budget (greedy marginal allocation).

    The expected squared logit error of a key code is E[(q·(k̂ − k))²] = tr(Σ_q Σ_δ); in the Σ_q eigenbasis
    it is Σ_c λ_c E[δ_c²] (only the error covariance's diagonal counts), the score-space error of SPEC §9
    before the 1/√d scale. Reverse water-filling (Cover & Thomas, Elements of Information Theory, Thm
    10.3.3) spends bits on components by their weighted variance; in its operational integer form (Goyal
    2001, "Theoretical foundations of transform coding", §III; Shoham & Gersho 1988) one starts from b = 0
    and repeatedly takes the steepest step λ_c·(D_c(b) − D_c(b′)) / cost(b → b′) over every coordinate and
    every b′ > b that the budget allows, cost = b′ − b, plus ``overhead`` when b = 0 (the scale and zero
    appear). Steps of more than one bit walk the lower convex hull of each coordinate's measured (rate,
    distortion) points: min–max codes are not convex at low rates (1 bit often does worse than the mean,
    D_c(1) > D_c(0)), and a one-bit-at-a-time greedy then never starts such a coordinate. On convex D the
    steps are single bits and this is Fox's (1966) greedy. A coordinate with λ_c = 0 gains nothing and
    gets 0 bits.

    Args:
        energy: λ (d,) query energy per coordinate, (RᵀΣ_qR)_cc.
        distortion: D (d, 9), the measured mean squared error of each coordinate at 0 … 8 bits.
        budget: bits per token for the whole head (codes + scales + zeros).
        overhead: scale + zero bits per token of a stored coordinate (32/group).
        byte: code bits are held in whole units of ``byte`` bits (8: bytes; 1: no padding).
        heads: (d,) the stream (KV head) each coordinate's code bits are packed in, padded apart; None: one.
            Coordinates of several KV heads allocated together share one budget (their logit errors add).
    Returns:
        (d,) long widths, spending at most ``budget`` with each stream's code bits padded to whole units.
    """
    d = len(energy)
    bits = torch.zeros(d, dtype=torch.long)
    lam, dist = energy.double(), distortion.double()
    heads = torch.zeros(d, dtype=torch.long) if heads is None else heads.long()
    targets = torch.arange(MAX_BITS + 1)  # b′
    padded = lambda n: torch.ceil(n / byte) * byte  # noqa: E731
    while True:
        ahead = targets[None, :] > bits[:, None]  # (d, 9) steps b → b′ > b
        gain = lam[:, None] * (dist.gather(1, bits[:, None]) - dist)  # (d, 9)
        cost = (targets[None, :] - bits[:, None]).double() + overhead * (bits[:, None] == 0)
        stream = torch.zeros(int(heads.max()) + 1, dtype=torch.float64).index_add_(0, heads, bits.double())  # code bits per stream
        own = stream[heads][:, None]  # (d, 1) code bits of the coordinate's stream before the step
        after = own + (targets[None, :] - bits[:, None])  # (d, 9) … and after it
        n_stored = int((bits > 0).sum()) + (bits[:, None] == 0).long()  # (d, 1)
        spent = padded(stream).sum() - padded(own) + padded(after) + n_stored * overhead
        ok = ahead & (gain > 0) & (spent <= budget + 1e-9)
        slope = torch.where(ok, gain / cost.clamp(min=1e-12), torch.full_like(gain, -math.inf))
        if not torch.isfinite(slope.max()):
            return bits
        c, b = divmod(int(slope.argmax()), MAX_BITS + 1)
        bits[c] = b


def _grouped_columns(y: torch.Tensor, group: int) -> torch.Tensor:
    """Calibration y (kv_head, block, token, d_head) -> (block, key, H·d) with key a multiple of ``group``."""
    h, n_block, t, d = y.shape
    t = t // group * group
    if t == 0:
        raise ValueError(f"calibration blocks must hold at least one group of {group} tokens")
    return y[:, :, :t].permute(1, 2, 0, 3).reshape(n_block, t, h * d)


def distortion_table(y: torch.Tensor, spec: TransformSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Measured D_c(b) for b = 0 … 8 and (lloyd-max) the levels for every width.

    Args:
        y: rotated calibration keys (kv_head, block, token, d_head).
    Returns:
        (D (kv_head, d_head, 9): mean squared error of each coordinate at b bits with the very quantizer used
        (b = 0: about its mean), levels (kv_head, d_head, 9, 256) or None).
    """
    h, _, _, d = y.shape
    cols = _grouped_columns(y.float(), spec.group)  # (block, key, H·d)
    n_col = cols.shape[-1]
    table = torch.zeros(n_col, MAX_BITS + 1, dtype=torch.float64)
    table[:, 0] = ((cols - cols.mean((0, 1))) ** 2).mean((0, 1)).double()
    levels, points = None, None
    if spec.grid != "uniform":
        levels = torch.zeros(n_col, MAX_BITS + 1, 2**MAX_BITS)
        points = cols if spec.grid == "static" else _normalised(cols, spec)
        points = points.reshape(-1, n_col).T.double().sort(-1).values.contiguous()  # (column, point)
    for b in range(1, MAX_BITS + 1):
        widths = torch.full((n_col,), b, dtype=torch.long)
        lv = None
        if spec.grid == "static":
            lv = static_levels(points, 2**b)
            lv = torch.cat([lv, lv[:, -1:].expand(-1, 2**MAX_BITS - 2**b)], -1)  # unused slots: the top level
            levels[:, b] = lv
        elif spec.grid != "uniform":
            lv = torch.zeros(n_col, 2**MAX_BITS)
            lv[:, : 2**b] = _lloyd_sorted(points, 2**b, pinned=spec.grid == "lloyd-max-pinned")
            lv[:, 2**b :] = 1.0
            levels[:, b] = lv
        q = quantize_columns(cols, widths, spec.grid, lv, spec.group, spec.scale_dtype)
        err = dequantize_columns(q, spec.grid, lv, spec.group) - cols
        table[:, b] = (err.double() ** 2).mean((0, 1))
    table = table.view(h, d, MAX_BITS + 1)
    return table, None if levels is None else levels.view(h, d, MAX_BITS + 1, -1)


def static_levels(points: torch.Tensor, n_levels: int, iterations: int = STATIC_ITERATIONS) -> torch.Tensor:
    """The static grid's levels: 1-D Lloyd-Max on raw sorted points (column, point) float64 -> (column, n_levels)
    float32 in the points' units.

    Started from the points' quantiles at (k + ½)/L (``quantile_init``), not from the uniform grid over
    [min, max]: key coordinates are heavy-tailed, and a uniform start leaves levels in the empty tails, where
    an empty cell keeps its level for good (a dead level: a code never used). Lloyd's iteration commutes
    with an affine map, so this is ``_lloyd_sorted`` on the points mapped to [0, 1] by the column's min and
    range, mapped back.
    """
    lo, hi = points[:, :1], points[:, -1:]
    span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    unit = ((points - lo) / span).contiguous()
    levels = _lloyd_sorted(unit, n_levels, iterations, init=quantile_init(unit, n_levels)).double()
    return (levels * span + lo).float()


def quantile_init(points: torch.Tensor, n_levels: int) -> torch.Tensor:
    """Starting levels: the sorted points (column, point) at ranks ⌊(k + ½)·n/L⌋, k = 0 … L − 1 -> (column, L)."""
    n = points.shape[-1]
    ranks = ((torch.arange(n_levels, dtype=torch.float64) + 0.5) * n / n_levels).long().clamp(max=n - 1)
    return points[:, ranks]


def _normalised(cols: torch.Tensor, spec: TransformSpec) -> torch.Tensor:
    """Each group min–max normalised to [0, 1] with the stored fp16 zero and range, (block, key, column)."""
    *lead, t, n_col = cols.shape
    g = cols.reshape(*lead, t // spec.group, spec.group, n_col)
    zero = g.amin(-2, keepdim=True).to(spec.scale_dtype).float()
    span = (g.amax(-2, keepdim=True) - zero).to(spec.scale_dtype).float()
    span = torch.where(span > 0, span, torch.ones_like(span))
    return ((g - zero) / span).clamp(0, 1).reshape(cols.shape)


def calibrate_layer(spec: TransformSpec, keys: torch.Tensor | None, sigma: torch.Tensor | None, n_kv: int, d: int) -> LayerCode:
    """One layer's code from calibration keys and Σ_q.

    Args:
        keys: (kv_head, block, token, d_head) calibration keys in the coordinates the cache quantizes
            (post- or pre-RoPE); needed when ``spec.needs_calibration()``.
        sigma: Σ_q (kv_head, d_head, d_head) in the same coordinates; needed by "query" and "waterfill".
    Raises:
        ValueError: a needed input is missing.
    """
    rotation = rotations(spec.rotation, n_kv, d, spec.seed, sigma)
    if not spec.needs_calibration():
        bits = torch.full((n_kv, d), spec.bits, dtype=torch.long)
        return LayerCode(rotation, bits, torch.zeros(n_kv, d), None, spec.grid, spec.group, spec.scale_dtype)
    if keys is None:
        raise ValueError(f"the {spec.rotation} rotation with {spec.allocation} bits and the {spec.grid} grid needs calibration keys")
    y = keys.float() if rotation is None else torch.einsum("hbtd,hde->hbte", keys.float(), rotation)  # (kv_head, block, token, d_head)
    mean = y.mean((1, 2)).float()  # (kv_head, d_head) μ_c
    table, levels_all = distortion_table(y, spec)
    if spec.allocation == "waterfill":
        if sigma is None:
            raise ValueError("water-filling needs the calibration query covariance Σ_q")
        rot = torch.eye(d, dtype=torch.float64).expand(n_kv, d, d) if rotation is None else rotation.double()
        energy = torch.diagonal(rot.transpose(-1, -2) @ sigma.double() @ rot, dim1=-2, dim2=-1)  # (kv_head, d_head) λ_c
        overhead = spec.overhead()  # 32/group, 0 on the static grid
        if spec.pool == "layer":  # one budget for the layer's KV heads: their logit errors add
            heads = torch.arange(n_kv).repeat_interleave(d)
            bits = waterfill(energy.reshape(-1), table.reshape(n_kv * d, -1), spec.total_budget() * d * n_kv, overhead,
                             heads=heads).view(n_kv, d)
        else:
            bits = torch.stack([waterfill(energy[h], table[h], spec.total_budget() * d, overhead) for h in range(n_kv)])
    else:
        bits = torch.full((n_kv, d), spec.bits, dtype=torch.long)
    levels = None
    if levels_all is not None:
        idx = bits.clamp(min=1)[..., None, None].expand(n_kv, d, 1, levels_all.shape[-1])
        levels = levels_all.gather(2, idx).squeeze(2)  # (kv_head, d_head, 256)
    return LayerCode(rotation, bits, mean, levels, spec.grid, spec.group, spec.scale_dtype)


@dataclass(frozen=True, eq=False)
class TransformCode:
    """A model's transform code: the spec and one ``LayerCode`` per layer, {layer: LayerCode}."""

    spec: TransformSpec
    layers: dict

    def bits_per_element(self) -> float:
        """Stored bits per quantized key element over all layers (every layer holds the same tokens)."""
        return sum(c.bits_per_element() for c in self.layers.values()) / len(self.layers)


@torch.no_grad()
def calibrate(lm, blocks: torch.Tensor | None, spec: TransformSpec, sigma_q: dict | None = None,
              pre_rope: bool = False) -> TransformCode:
    """Per-layer transform codes from calibration blocks (block, token) of the calib split.

    Args:
        sigma_q: {layer: (kv_head, d_head, d_head)} the query covariance in the coordinates keys are quantized
            in, needed by the query rotation and water-filling: post-RoPE Σ_q (``headq.query_covariances``),
            or pre-RoPE the RoPE-averaged Σ̄ = mean_Δ M_Δᵀ Σ'_q M_Δ (``rope.averaged_query_covariances``,
            which makes E[(q·δ_post)²] = δ'ᵀ Σ̄ δ' for a pre-RoPE key error δ'); computed here when None.
        pre_rope: keys are quantized before RoPE: calibration keys are un-rotated at their positions
            (``rope.unrotate``).
    Raises:
        ValueError: calibration is needed and no blocks are given; pre-RoPE on a model without RoPE.
    """
    from atlas_core.extract import extract
    from atlas_core.kvquant import rope
    from atlas_core.kvquant.headq import query_covariances

    s = lm.spec
    uses_sigma = spec.rotation == "query" or spec.allocation == "waterfill"
    if not spec.needs_calibration():
        return TransformCode(spec, {l: calibrate_layer(spec, None, None, s.n_kv_heads, s.d_head) for l in range(s.n_layers)})
    if blocks is None:
        raise ValueError(f"the {spec.rotation} rotation with {spec.allocation} bits and the {spec.grid} grid needs "
                         "calibration blocks (the calib split)")
    if uses_sigma and sigma_q is None:
        sigma_q = rope.averaged_query_covariances(lm, blocks) if pre_rope else query_covariances(lm, blocks)
    acts = extract(lm, blocks, list(range(s.n_layers)), fields=("k",), progress=False)
    tables = rope.rotary_tables(lm.model) if pre_rope else None
    n_block, t = blocks.shape
    layers = {}
    for layer, a in acts.items():
        keys = a.k.reshape(s.n_kv_heads, n_block, t, s.d_head)  # points are block-major
        if tables is not None:
            cos, sin = tables[layer](torch.arange(t))
            keys = rope.unrotate(keys, cos.to(keys), sin.to(keys))
        layers[layer] = calibrate_layer(spec, keys, None if sigma_q is None else sigma_q[layer], s.n_kv_heads, s.d_head)
    return TransformCode(spec, layers)
