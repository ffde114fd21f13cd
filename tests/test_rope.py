"""RoPE re-rotation used by position-augmented calibration."""

import pytest
import torch

from vllm_kvcompress.offline import rope


def _reference_rope(x, position, theta):
    # transformers' formulation: x * cos + rotate_half(x) * sin, angles repeated over both halves
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = torch.cat([position * inv, position * inv])
    half = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1)
    return x * ang.cos().float() + half * ang.sin().float()


def test_moving_a_key_equals_rope_at_the_new_position():
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(2, 5, 64, generator=g)
    positions = torch.tensor([0, 3, 100, 4095, 9000])
    post = torch.stack([_reference_rope(raw[:, t], float(p), 1e6) for t, p in enumerate(positions)], 1)
    target = torch.tensor([31000, 7, 100, 0, 20000])
    moved = rope.rotate(post, target - positions, 1e6)
    expected = torch.stack([_reference_rope(raw[:, t], float(p), 1e6) for t, p in enumerate(target)], 1)
    torch.testing.assert_close(moved, expected, atol=2e-4, rtol=1e-4)


def test_rotation_keeps_norms_and_composes():
    g = torch.Generator().manual_seed(1)
    k = torch.randn(3, 6, 32, generator=g)
    a, b = torch.randint(-5000, 5000, (6,), generator=g), torch.randint(-5000, 5000, (6,), generator=g)
    torch.testing.assert_close(rope.rotate(rope.rotate(k, a, 1e4), b, 1e4), rope.rotate(k, a + b, 1e4), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rope.rotate(k, a, 1e4).norm(dim=-1), k.norm(dim=-1), atol=1e-4, rtol=1e-5)


def test_spread_positions_shape_and_determinism():
    k = torch.randn(2, 10, 16)
    one = rope.spread_positions(k, 1e4, 4096, 3, torch.Generator().manual_seed(0))
    two = rope.spread_positions(k, 1e4, 4096, 3, torch.Generator().manual_seed(0))
    assert one.shape == (2, 30, 16) and torch.equal(one, two)


def test_scaled_rope_is_refused():
    class Config:
        rope_parameters = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}

    with pytest.raises(rope.UnsupportedRope, match="plain RoPE only.*--positions 0"):
        rope.check_default_rope(Config())

    class Plain:
        rope_parameters = {"rope_type": "default", "rope_theta": 1e6}

    assert rope.check_default_rope(Plain()) == 1e6


def test_rotation_tables_give_the_directly_computed_angles():
    """Whole-number deltas come from a cached table (decode re-rotates every kept key each
    step); its values are the directly computed ones, bit for bit, negative deltas included."""
    from vllm_kvcompress.kernels import rope_ref

    delta = torch.cat([torch.arange(-3000, 3000, 7), torch.tensor([0, 40000])])
    for theta in (1e4, 1e6):
        cos, sin = rope_ref.cos_sin(delta, 64, theta, "cpu")
        angle = rope_ref._angles(delta, 64, theta, "cpu")
        assert torch.equal(cos, angle.cos().float()) and torch.equal(sin, angle.sin().float())
    fractional = torch.tensor([0.5, -2.25])
    cos, sin = rope_ref.cos_sin(fractional, 64, 1e4, "cpu")
    assert torch.equal(sin, rope_ref._angles(fractional, 64, 1e4, "cpu").sin().float())


def test_turning_back_equals_turning_by_the_negated_positions():
    k = torch.randn(2, 50, 64, generator=torch.Generator().manual_seed(3))
    positions = torch.randint(0, 5000, (50,), generator=torch.Generator().manual_seed(4))
    back = rope.rotate(k, positions, 1e6, nonnegative=True, back=True)
    torch.testing.assert_close(back, rope.rotate(k, -positions, 1e6), atol=0, rtol=0)
    torch.testing.assert_close(rope.rotate(back, positions, 1e6, nonnegative=True), k, atol=1e-4, rtol=1e-4)
