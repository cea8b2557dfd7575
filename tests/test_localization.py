"""Tests for usjepa.localization: the 3D relative-localization auxiliary loss (paper §2.2)."""
import copy
import itertools

import pytest
import torch

from usjepa.localization import (LocalizationHead, LocalizationLoss, chance_loss, localization_loss, split_pairs,
                                 relative_offsets, sample_pairs, token_coords)


# ---------------------------------------------------------------- token grid
def test_token_coords_inverts_time_major_flattening():
    for grid in [(1, 1, 1), (2, 3, 4), (8, 14, 14), (3, 1, 5)]:
        n = grid[0] * grid[1] * grid[2]
        # independent: brute-force loop in the documented order n = t*gh*gw + i*gw + j
        expected = [(t, i, j) for t in range(grid[0]) for i in range(grid[1]) for j in range(grid[2])]
        assert token_coords(torch.arange(n), grid).tolist() == [list(c) for c in expected]


def test_token_coords_keeps_batch_shape():
    idx = torch.tensor([[0, 5, 23], [1, 12, 22]])
    c = token_coords(idx, (2, 3, 4))
    assert c.shape == (2, 3, 3) and c.dtype == torch.int64
    assert c[1, 1].tolist() == [1, 0, 0] and c[0, 1].tolist() == [0, 1, 1]


def test_token_coords_matches_conv3d_patch_embedding():
    "Token n of the encoder's own Conv3d patch embedding must cover tubelet token_coords(n)."
    from usjepa.model import vit_tiny
    T, H, W, tub, p = 4, 48, 32, 2, 16                                # rectangular: rows and columns differ
    enc = vit_tiny(img_size=(H, W), num_frames=T, patch_size=p, tubelet_size=tub)
    grid = tuple(enc.grid)
    assert grid == (T // tub, H // p, W // p)
    proj = enc.patch_embed.proj
    assert isinstance(proj, torch.nn.Conv3d)
    # a clip whose channel c holds the c-th tubelet coordinate of every pixel
    t = torch.arange(T)[:, None, None].expand(T, H, W) // tub
    i = torch.arange(H)[None, :, None].expand(T, H, W) // p
    j = torch.arange(W)[None, None, :].expand(T, H, W) // p
    video = torch.stack([t, i, j]).float()[None]                      # (1, 3, T, H, W)
    with torch.no_grad():                                             # out channel c = mean of in channel c
        proj.weight.zero_(); proj.bias.zero_()
        for c in range(3): proj.weight[c, c] = 1.0 / (tub * p * p)
        tokens = enc.patch_embed(video)                               # (1, N, D) in the encoder's order
    n = grid[0] * grid[1] * grid[2]
    assert tokens.shape[:2] == (1, n)
    assert torch.equal(tokens[0, :, :3].round().long(), token_coords(torch.arange(n), grid))


def test_token_coords_rejects_bad_input():
    with pytest.raises(ValueError, match='out of range'): token_coords(torch.tensor([24]), (2, 3, 4))
    with pytest.raises(ValueError, match='out of range'): token_coords(torch.tensor([-1]), (2, 3, 4))
    with pytest.raises(ValueError, match='dtype'): token_coords(torch.tensor([1.0]), (2, 3, 4))
    with pytest.raises(ValueError, match='grid'): token_coords(torch.tensor([1]), (2, 3))


# ---------------------------------------------------------------- offsets
def test_relative_offsets_hand_picked():
    grid = (8, 14, 14)
    a, b = torch.tensor([5, 3, 10]), torch.tensor([1, 7, 2])
    torch.testing.assert_close(relative_offsets(a, b, grid), torch.tensor([4 / 8, -4 / 14, 8 / 14]))
    torch.testing.assert_close(relative_offsets(b, a, grid), torch.tensor([-4 / 8, 4 / 14, -8 / 14]))
    torch.testing.assert_close(relative_offsets(a, a, grid), torch.zeros(3))
    # from flat indices: token 1 is one column right of token 0; token gh*gw one step later
    c = token_coords(torch.tensor([0, 1, 14, 196]), grid)
    torch.testing.assert_close(relative_offsets(c[1], c[0], grid), torch.tensor([0, 0, 1 / 14]))
    torch.testing.assert_close(relative_offsets(c[2], c[0], grid), torch.tensor([0, 1 / 14, 0]))
    torch.testing.assert_close(relative_offsets(c[0], c[3], grid), torch.tensor([-1 / 8, 0, 0]))


def test_relative_offsets_stay_inside_unit_cube():
    grid = (4, 5, 3)
    c = token_coords(torch.arange(60), grid)
    d = relative_offsets(c[:, None], c[None], grid)
    assert d.abs().max() < 1
    assert torch.isclose(d.abs().amax((0, 1)), torch.tensor([3 / 4, 4 / 5, 2 / 3])).all()


# ---------------------------------------------------------------- pairs
def test_sample_pairs_never_self_and_uniform():
    g = torch.Generator().manual_seed(0)
    for K in [2, 3, 17, 500]:
        a, b = sample_pairs(K, batch=8, n_pairs=2000, generator=g)
        assert a.shape == b.shape == (8, 2000) and a.dtype == torch.int64
        assert (a != b).all()
        assert a.min() >= 0 and b.min() >= 0 and a.max() < K and b.max() < K
    # every ordered distinct pair of 5 tokens appears, with about equal frequency (20 pairs, 100k draws)
    a, b = sample_pairs(5, batch=100, n_pairs=1000, generator=g)
    counts = torch.bincount((a * 5 + b).flatten(), minlength=25).reshape(5, 5)
    assert (counts.diagonal() == 0).all()
    off = counts[~torch.eye(5, dtype=torch.bool)].float()
    assert off.min() > 0.9 * off.mean() and off.max() < 1.1 * off.mean()


def test_sample_pairs_default_and_errors():
    a, b = sample_pairs(10, batch=3)
    assert a.shape == (3, 100)
    with pytest.raises(ValueError, match='num_tokens=1'): sample_pairs(1, batch=2)
    with pytest.raises(ValueError, match='n_pairs'): sample_pairs(4, batch=2, n_pairs=0)


# ---------------------------------------------------------------- head and loss
def test_head_is_three_linear_layers():
    head = LocalizationHead(24, hidden=40)
    lin = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in lin] == [(48, 40), (40, 40), (40, 3)]
    e1, e2 = torch.randn(2, 7, 24), torch.randn(2, 7, 24)
    assert head(e1, e2).shape == (2, 7, 3)
    assert not torch.allclose(head(e1, e2), head(e2, e1))     # order matters (Δ is signed)


def test_localization_loss_matches_loop():
    torch.manual_seed(0)
    grid, B, K, D, P = (3, 4, 5), 2, 30, 8, 40
    head = LocalizationHead(D)
    preds = torch.randn(B, K, D)
    tgt = torch.stack([torch.randperm(60)[:K].sort().values for _ in range(B)])
    loss = localization_loss(head, preds, tgt, grid, n_pairs=P, generator=torch.Generator().manual_seed(7))
    a, b = sample_pairs(K, B, P, generator=torch.Generator().manual_seed(7))
    total = 0.0
    for s, p in itertools.product(range(B), range(P)):
        n1, n2 = tgt[s, a[s, p]].item(), tgt[s, b[s, p]].item()
        c1 = (n1 // 20, n1 % 20 // 5, n1 % 5); c2 = (n2 // 20, n2 % 20 // 5, n2 % 5)
        truth = torch.tensor([(c1[0] - c2[0]) / 3, (c1[1] - c2[1]) / 4, (c1[2] - c2[2]) / 5])
        total += ((head(preds[s, a[s, p]], preds[s, b[s, p]]) - truth) ** 2).sum().item()   # Eq. 3: summed over t, i, j
    assert abs(loss.item() - total / (B * P)) < 1e-5


def test_localization_loss_averages_generators():
    torch.manual_seed(0)
    grid, head = (2, 4, 4), LocalizationHead(6)
    p1, i1 = torch.randn(2, 20, 6), torch.arange(20).expand(2, 20)
    p2, i2 = torch.randn(2, 9, 6), torch.arange(9).expand(2, 9) * 3
    both = localization_loss(head, [p1, p2], [i1, i2], grid, 30, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)     # 30 pairs per clip: 15 from each generator, one pooled mean
    l1 = localization_loss(head, p1, i1, grid, 15, g); l2 = localization_loss(head, p2, i2, grid, 15, g)
    assert torch.isclose(both, (l1 + l2) / 2)
    assert split_pairs(100, 2) == [50, 50] and split_pairs(7, 2) == [4, 3]
    with pytest.raises(ValueError, match='n_pairs=1'): localization_loss(head, [p1, p2], [i1, i2], grid, 1)
    with pytest.raises(ValueError, match='disagree'): localization_loss(head, p1, i2, grid)
    with pytest.raises(ValueError, match='one tgt_idx'): localization_loss(head, [p1, p2], [i1], grid)


def test_chance_loss_brute_force():
    for grid in [(2, 3, 4), (8, 4, 4), (1, 5, 2)]:
        n = grid[0] * grid[1] * grid[2]
        c = token_coords(torch.arange(n), grid)
        d = relative_offsets(c[:, None], c[None], grid)
        assert abs(chance_loss(grid) - ((d ** 2).sum(-1).sum() / (n * (n - 1))).item()) < 1e-6


# ---------------------------------------------------------------- inside V-JEPA pretraining
def _tiny_vjepa(seed=0):
    from usjepa.model import Predictor, vit_tiny
    from usjepa.vjepa import VJEPA
    torch.manual_seed(seed)
    enc = vit_tiny(img_size=32, num_frames=4, patch_size=16, tubelet_size=2)
    pred = Predictor(enc.grid, enc.embed_dim, predictor_embed_dim=32, depth=1, num_heads=2)
    return VJEPA(enc, pred)


def _masks(grid, B=2, seed=0):
    from usjepa.masking import vjepa_masks
    return vjepa_masks(B, grid, generator=torch.Generator().manual_seed(seed))


def test_gradients_reach_encoder_predictor_and_head():
    model = _tiny_vjepa()
    aux = LocalizationLoss(model.encoder.embed_dim, grid=model.encoder.grid, n_pairs=20)
    video = torch.randn(2, 3, 4, 32, 32)
    out = model(video, _masks(model.encoder.grid))
    aux(out, model).backward()                      # L_ll alone
    for name, mod in [('encoder', model.encoder), ('predictor', model.predictor), ('head', aux.head)]:
        grads = [p.grad for p in mod.parameters() if p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), f'no L_ll gradient in the {name}'
    assert model.encoder.patch_embed.proj.weight.grad.abs().sum() > 0   # all the way to the first layer
    assert all(p.grad is None for p in model.target_encoder.parameters())


def test_lambda_one_is_plain_vjepa():
    from usjepa.vjepa import pretrain_step
    m1 = _tiny_vjepa(); m2 = copy.deepcopy(m1)
    aux = LocalizationLoss(m1.encoder.embed_dim, grid=m1.encoder.grid)
    video = torch.randn(2, 3, 4, 32, 32)
    masks = _masks(m1.encoder.grid)
    kw = dict(lr=1e-3, wd=0.05, momentum=0.99)
    o1 = torch.optim.AdamW(m1.parameters()); o2 = torch.optim.AdamW(list(m2.parameters()) + list(aux.parameters()))
    r1 = pretrain_step(m1, video, masks, o1, **kw)
    r2 = pretrain_step(m2, video, masks, o2, aux=aux, lam=1.0, **kw)
    assert r1['loss'] == r2['loss']
    for (n, p1), p2 in zip(m1.named_parameters(), m2.parameters()): assert torch.equal(p1, p2), n
    for p1, p2 in zip(m1.target_encoder.parameters(), m2.target_encoder.parameters()): assert torch.equal(p1, p2)


def test_combined_loss_mixes_with_lambda():
    from usjepa.vjepa import pretrain_step
    model = _tiny_vjepa()
    aux = LocalizationLoss(model.encoder.embed_dim, grid=model.encoder.grid)
    before = [p.detach().clone() for p in aux.head.parameters()]
    opt = torch.optim.AdamW(list(model.parameters()) + list(aux.parameters()))
    r = pretrain_step(model, torch.randn(2, 3, 4, 32, 32), _masks(model.encoder.grid), opt,
                      lr=1e-3, wd=0.05, momentum=0.99, aux=aux, lam=0.25)
    assert any(not torch.equal(b, p) for b, p in zip(before, aux.head.parameters()))   # the head trains jointly
    assert abs(r['loss'] - (0.25 * r['loss_jepa'] + 0.75 * r['loss_aux'])) < 1e-5
    assert r['loss_aux'] > 0


def test_head_weight_decay_follows_the_schedule():
    from usjepa.vjepa import pretrain_step, param_groups
    model = _tiny_vjepa()
    aux = LocalizationLoss(model.encoder.embed_dim, grid=model.encoder.grid, n_pairs=10)
    opt = torch.optim.AdamW(param_groups(model, 0.04) + param_groups(aux, 0.04))
    pretrain_step(model, torch.randn(2, 3, 4, 32, 32), _masks(model.encoder.grid), opt,
                  lr=1e-3, wd=0.25, momentum=0.99, aux=aux, lam=0.25)
    decay = {id(p): g['weight_decay'] for g in opt.param_groups for p in g['params']}
    lins = [m for m in aux.head.modules() if isinstance(m, torch.nn.Linear)]
    assert [decay[id(m.weight)] for m in lins] == [0.25] * 3 and [decay[id(m.bias)] for m in lins] == [0.] * 3
    for n, p in list(model.named_parameters()) + list(aux.named_parameters()):
        if p.requires_grad: assert decay[id(p)] == (0. if n.endswith('bias') or p.ndim == 1 else 0.25), n
