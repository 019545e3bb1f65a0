import pytest
import torch

from rsgm.physics.channels import CHANNEL_NAMES, ChannelLayout, channel_masks, channel_values

# Golden 4x6 layout from the table in reference_code_facts.md: mr = 2, mc = 3;
# digits are channel numbers 1-5.
GOLDEN_4x6 = [
    [5, 3, 5, 4, 5, 4],
    [3, 5, 3, 5, 4, 5],
    [5, 1, 5, 2, 5, 2],
    [1, 5, 1, 5, 2, 5],
]


def as_channel_numbers(masks: torch.Tensor) -> torch.Tensor:
    return (masks.long() * torch.arange(1, 6).view(5, 1, 1)).sum(0)


def test_golden_layout_small_grid():
    assert as_channel_numbers(channel_masks(4, 6)).tolist() == GOLDEN_4x6


@pytest.mark.parametrize("shape", [(44, 44), (56, 30)])
def test_masks_partition_the_detector(shape):
    masks = channel_masks(*shape)
    assert masks.shape == (5, *shape)
    assert torch.equal(masks.sum(0), torch.ones(shape, dtype=torch.long))
    rows, cols = shape
    i, j = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    odd = (i + j) % 2 == 1
    assert torch.equal(masks[4], ~odd)  # PMTc: (i + j) even, whole image
    assert torch.equal(masks[0], odd & (i >= rows // 2) & (j < cols // 2))  # ch1: rows mr:, cols :mc
    assert torch.equal(masks[3], odd & (i < rows // 2) & (j >= cols // 2))  # ch4: rows :mr, cols mc:
    assert int(masks[4].sum()) == rows * cols // 2


def test_alternative_layout_is_explicit():
    flipped = channel_masks(4, 6, ChannelLayout(quadrant_parity=0, quadrant_order=("top_left", "top_right", "bottom_left", "bottom_right")))
    default = channel_masks(4, 6)
    assert torch.equal(flipped[4], ~default[4])
    with pytest.raises(ValueError, match="quadrant_parity"):
        ChannelLayout(quadrant_parity=2)
    with pytest.raises(ValueError, match="permutation"):
        ChannelLayout(quadrant_order=("top_left",) * 4)


def test_channel_values_are_mask_sums():
    images = torch.rand(3, 1, 44, 44) * 10
    values = channel_values(images, channel_masks(44, 44))
    for c in range(5):
        expected = images[:, 0][:, channel_masks(44, 44)[c]].sum(1).double()
        assert torch.allclose(values[:, c], expected)
    assert torch.allclose(values.sum(1), images.double().sum((1, 2, 3)))
    assert len(CHANNEL_NAMES) == 5
    with pytest.raises(ValueError, match="do not match channel masks"):
        channel_values(torch.rand(2, 56, 30), channel_masks(44, 44))
