import math
import pytest
import torch
from usjepa.masking import MultiBlockMask3D, VJEPA_MASKS, vjepa_masks, tube_mask

GRIDS = [(8, 14, 14), (8, 7, 7), (4, 6, 10), (1, 5, 3)]


@pytest.mark.parametrize('grid', GRIDS)
def test_context_target_disjoint_sorted_in_grid(grid):
    g = torch.Generator().manual_seed(0)
    n = math.prod(grid)
    for ctx, tgt in vjepa_masks(5, grid, g):
        assert ctx.dtype == tgt.dtype == torch.int64
        assert ctx.shape[0] == tgt.shape[0] == 5 and ctx.shape[1] > 0 and tgt.shape[1] > 0
        for c, t in zip(ctx, tgt):
            assert c.min() >= 0 and c.max() < n and t.min() >= 0 and t.max() < n
            assert (c.diff() > 0).all() and (t.diff() > 0).all()          # sorted, no repeats
            assert not set(c.tolist()) & set(t.tolist())                    # disjoint


@pytest.mark.parametrize('grid', GRIDS)
def test_blocks_span_all_time_steps(grid):
    "With temporal_scale 1 the hidden set is the same spatial map in every time step (before the batch cut)."
    g = torch.Generator().manual_seed(1)
    for cfg in VJEPA_MASKS:
        mg = MultiBlockMask3D(grid, **cfg)
        for _ in range(20):
            hidden = mg.sample_target(mg.sample_block_size(g), g)
            assert hidden.any()
            assert (hidden == hidden[:1]).all()
        # with batch size 1 there is no cut: context + target = the whole grid, and each is a tube
        ctx, tgt = mg(1, g)
        assert sorted(ctx[0].tolist() + tgt[0].tolist()) == list(range(math.prod(grid)))
        per_frame = tgt[0].view(grid[0], -1) % (grid[1] * grid[2])
        assert (per_frame == per_frame[:1]).all()


def test_block_size_formula():
    "Block height/width follow round(sqrt(keep*ar)), round(sqrt(keep/ar)) with keep = int(h*w*scale)."
    grid = (8, 14, 14)
    mg = MultiBlockMask3D(grid, spatial_scale=(0.15, 0.15), aspect_ratio=(0.75, 1.5))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for _ in range(20):
        t, h, w = mg.sample_block_size(g1)
        r = torch.rand(3, generator=g2).tolist()     # the same three draws, by hand
        keep = int(196 * 0.15)
        ar = 0.75 + r[2] * 0.75
        assert (t, h, w) == (8, round(math.sqrt(keep * ar)), round(math.sqrt(keep / ar)))


def test_ratios_match_vjepa():
    "On the 16x224x224 grid (8x14x14) the per-sample hidden fraction is ~63% (8 x 15%) and ~81% (2 x 70%)."
    g = torch.Generator().manual_seed(0)
    grid = (8, 14, 14)
    expected = [(0.58, 0.68), (0.76, 0.87)]
    for cfg, (lo, hi) in zip(VJEPA_MASKS, expected):
        mg = MultiBlockMask3D(grid, **cfg)
        r = torch.tensor([mg.sample_target(mg.sample_block_size(g), g).float().mean() for _ in range(400)])
        assert lo < r.mean() < hi, (cfg, r.mean())
        # the batched target list is cut to the shortest sample: never above the per-sample mean's max
        _, tgt = mg(16, g)
        assert tgt.shape[1] / 1568 <= r.max()


def test_same_seed_same_masks():
    a = vjepa_masks(4, (8, 14, 14), torch.Generator().manual_seed(7))
    b = vjepa_masks(4, (8, 14, 14), torch.Generator().manual_seed(7))
    c = vjepa_masks(4, (8, 14, 14), torch.Generator().manual_seed(8))
    for (ca, ta), (cb, tb) in zip(a, b):
        assert torch.equal(ca, cb) and torch.equal(ta, tb)
    assert any(ta.shape != tc.shape or not torch.equal(ta, tc) for (_, ta), (_, tc) in zip(a, c))


def test_max_keep_caps_context():
    ctx, _ = MultiBlockMask3D((8, 14, 14), num_blocks=1, max_keep=100)(3, torch.Generator().manual_seed(0))
    assert ctx.shape == (3, 100)


def test_bad_arguments():
    with pytest.raises(ValueError, match='grid'): MultiBlockMask3D((8, 14))
    with pytest.raises(ValueError, match='spatial_scale'): MultiBlockMask3D((8, 14, 14), spatial_scale=(0.5, 1.5))
    with pytest.raises(ValueError, match='num_blocks'): MultiBlockMask3D((8, 14, 14), num_blocks=0)
    with pytest.raises(ValueError, match='ratio'): tube_mask(2, (8, 14, 14), ratio=1.0)


def test_tube_mask():
    grid = (8, 14, 14)
    vis, msk = tube_mask(3, grid, ratio=0.9, generator=torch.Generator().manual_seed(0))
    n_masked = int(0.9 * 196)
    assert msk.shape == (3, 8 * n_masked) and vis.shape == (3, 8 * (196 - n_masked))
    for v, m in zip(vis, msk):
        assert sorted(v.tolist() + m.tolist()) == list(range(1568))
        spatial = (m % 196).view(8, -1)
        assert (spatial == spatial[:1]).all()                 # same positions in every time step
        assert (m // 196).view(8, -1).T.eq(torch.arange(8)).all()
    assert not torch.equal(msk[0], msk[1])                    # a different mask per sample
    a = tube_mask(2, grid, generator=torch.Generator().manual_seed(3))
    b = tube_mask(2, grid, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_tiny_grid_fails_fast_instead_of_hanging():
    import time
    from usjepa.masking import check_mask_grid
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r'grid \(2, 1, 1\) is too small'): vjepa_masks(2, (2, 1, 1))
    with pytest.raises(ValueError, match=r'\(2, 1, 1\) is too small for mask generator 0'): check_mask_grid((2, 1, 1))
    assert time.perf_counter() - t0 < 2
    mg = MultiBlockMask3D((1, 2, 2), spatial_scale=(0.5, 0.5), aspect_ratio=(1., 1.), num_blocks=64, max_tries=3)
    with pytest.raises(ValueError, match='3 draws'): mg(2, generator=torch.Generator().manual_seed(0))
    assert check_mask_grid((8, 14, 14)) == (8, 14, 14) and check_mask_grid([4, 2, 2]) == (4, 2, 2)
