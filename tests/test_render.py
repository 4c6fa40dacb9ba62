"""Label-map upsampling: the channel argmax and the chunked path for large images."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stages.render import argmax_channels, onehot_maps, upsample_labels


def test_argmax_channels_is_argmax_over_the_first_axis_ties_included():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(7, 31, 45, generator=g)
    assert torch.equal(argmax_channels(x), x.argmax(0))
    ties = torch.randint(0, 3, (5, 20, 30), generator=g).float() / 2  # many exact ties
    assert torch.equal(argmax_channels(ties), ties.argmax(0))


def test_bilinear_upsampling_is_the_argmax_of_the_interpolated_one_hot_maps():
    rng = np.random.default_rng(1)
    pmap = rng.choice([3, 7, 9, 250], size=(6, 9)).astype(np.uint8)
    ids, _, onehot = onehot_maps(pmap)
    want = ids[F.interpolate(onehot, size=(50, 70), mode="bilinear", align_corners=False)[0].argmax(0).numpy()]
    assert np.array_equal(upsample_labels(pmap, (50, 70)), want)
    near = upsample_labels(pmap, (12, 18), mode="nearest")
    assert np.array_equal(near, np.repeat(np.repeat(pmap, 2, 0), 2, 1))


@pytest.mark.slow
def test_large_images_take_the_chunked_path_with_the_same_result():
    rng = np.random.default_rng(2)
    pmap = rng.integers(0, 3, size=(8, 8)).astype(np.uint8)
    H, W = 4800, 4800  # 3 maps x 4800 x 4800 x 4 bytes > 256 MB: interpolated in row chunks
    ids, _, onehot = onehot_maps(pmap)
    assert len(ids) * H * W * 4 > (256 << 20)
    want = ids[F.interpolate(onehot, size=(H, W), mode="bilinear", align_corners=False)[0].argmax(0).numpy()]
    got = upsample_labels(pmap, (H, W))
    assert (got == want).mean() > 0.9999  # float rounding of the two-step interpolation may flip a tie
