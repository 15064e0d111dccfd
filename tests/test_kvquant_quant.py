"""Quantizers: vectorised against the loop reference, known answers, bit accounting."""

import pytest
import torch

from atlas_core.kvquant import quant
from atlas_core.kvquant.quant import QuantSpec


def _x(shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("axis,group", [("token", 8), ("token", 64), ("channel", 4)])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32])
def test_vectorised_matches_reference(bits, axis, group, scale_dtype):
    spec = QuantSpec(bits=bits, group=group, axis=axis, scale_dtype=scale_dtype)
    x = _x((12, 16))  # (key, d_head)
    fast, ref = quant.quantize(x, spec), quant.quantize_ref(x, spec)
    for a, b in zip(fast, ref):
        assert torch.equal(a, b)
    assert torch.equal(quant.dequantize(fast, spec), quant.dequantize_ref(ref, spec))


def test_batched_equals_per_slice():
    spec = QuantSpec(bits=3, group=4, axis="channel")
    x = _x((2, 3, 8, 16))  # (batch, kv_head, key, d_head)
    full = quant.dequantize(quant.quantize(x, spec), spec)
    for b in range(2):
        for h in range(3):
            assert torch.equal(full[b, h], quant.dequantize_ref(quant.quantize_ref(x[b, h], spec), spec))


@pytest.mark.parametrize("axis,group", [("token", 8), ("channel", 4)])
def test_grid_values_are_exact(axis, group):
    spec = QuantSpec(bits=4, group=group, axis=axis, scale_dtype=torch.float32)
    codes = torch.randint(0, 16, (8, 16), generator=torch.Generator().manual_seed(1))
    if axis == "token":  # every group holds the min and the max code
        codes[:, 0], codes[:, 1], codes[:, 8], codes[:, 9] = 0, 15, 0, 15
    else:
        codes[0], codes[1], codes[4], codes[5] = 0, 15, 0, 15
    x = -1.5 + 0.25 * codes.float()  # on the grid of scale 0.25, zero -1.5
    assert torch.equal(quant.dequantize(quant.quantize(x, spec), spec), x)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("axis", ["token", "channel"])
def test_error_at_most_half_a_step(bits, axis):
    spec = QuantSpec(bits=bits, group=8, axis=axis, scale_dtype=torch.float32)
    x = _x((16, 32), seed=bits)
    q = quant.quantize(x, spec)
    err = (quant.dequantize(q, spec) - x).abs()
    step = q.scale.repeat_interleave(8, dim=-1) if axis == "token" else q.scale.repeat_interleave(8, dim=0)
    assert (err <= step / 2 * (1 + 1e-5) + 1e-6).all()


def test_two_bits_has_four_levels():
    spec = QuantSpec(bits=2, group=32, axis="token", scale_dtype=torch.float32)
    x = _x((5, 32))
    q = quant.quantize(x, spec)
    assert q.codes.max() == 3 and q.codes.min() == 0
    for row in quant.dequantize(q, spec):
        assert len(row.unique()) <= 4


def test_constant_group_is_exact():
    spec = QuantSpec(bits=2, group=4, axis="token")
    x = torch.full((3, 8), 0.5)
    assert torch.equal(quant.dequantize(quant.quantize(x, spec), spec), x)


def test_bits_per_element():
    assert quant.bits_per_element(QuantSpec(bits=2, group=32, axis="token"), 64) == 3.0
    assert quant.bits_per_element(QuantSpec(bits=2, group=128, axis="token"), 64) == 2.5  # group clamps to the head
    assert quant.bits_per_element(QuantSpec(bits=4, group=64, axis="channel"), 64) == 4.5
    assert quant.bits_per_element(None, 64) == 16.0
    x = _x((2, 2, 64, 64))
    for spec in (QuantSpec(bits=2, group=32, axis="token"), QuantSpec(bits=3, group=32, axis="channel")):
        assert quant.stored_bits(quant.quantize(x, spec), spec) == x.numel() * quant.bits_per_element(spec, 64)


def test_channel_needs_whole_groups_and_drop_front():
    spec = QuantSpec(bits=2, group=4, axis="channel")
    with pytest.raises(ValueError, match="multiple of 4"):
        quant.quantize(_x((6, 8)), spec)
    x = _x((12, 8))
    q = quant.quantize(x, spec)
    tail = quant.drop_front(q, 8, spec)
    assert torch.equal(quant.dequantize(tail, spec), quant.dequantize(q, spec)[8:])
    with pytest.raises(ValueError):
        quant.drop_front(q, 3, spec)


def test_bad_specs():
    with pytest.raises(ValueError):
        QuantSpec(bits=9)
    with pytest.raises(ValueError):
        QuantSpec(axis="row")


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 16, 64])
def test_pack_unpack_round_trip_and_size(bits, n):
    codes = torch.randint(0, 2**bits, (2, 3, n), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    packed = quant.pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3, -(-n * bits // 8))
    assert torch.equal(quant.unpack(packed, bits, n), codes)


def test_pack_known_answer():
    codes = torch.tensor([[3, 0, 1, 2]], dtype=torch.uint8)  # 11 00 01 10
    assert quant.pack(codes, 2).tolist() == [[0b11000110]]
    three = torch.tensor([[7, 0, 5]], dtype=torch.uint8)  # 111 000 101 (+ 7 zero bits)
    assert quant.pack(three, 3).tolist() == [[0b11100010, 0b10000000]]


@pytest.mark.parametrize("bits", [0, 9, 2.5, True, "2"])
def test_one_bits_rule_for_every_kv_code(bits):
    """QuantSpec, KVMethod's kbits/vbits/side_bits and SideCode all refuse what ``quant.check_bits`` refuses."""
    from atlas_core.kvquant.experiment import KVMethod
    from atlas_core.kvquant.headq import SideCode

    with pytest.raises(ValueError, match="bits must be an integer in 1..8"):
        QuantSpec(bits=bits)
    for name in ("kbits", "vbits", "side_bits"):
        with pytest.raises(ValueError, match=f"{name} must be an integer in 1..8"):
            KVMethod(method="headq", **{name: bits})
    with pytest.raises(ValueError, match="side-code bits must be an integer in 1..8"):
        SideCode(bases={}, bits=bits)


def test_one_bit_codes_are_allowed_everywhere():
    assert QuantSpec(bits=1).levels == 2
    quant.check_bits(1, "kbits")
