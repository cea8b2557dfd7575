import math
import pytest
import torch
from usjepa.model import (VisionTransformer, Predictor, apply_masks, build_encoder, build_predictor, vit_tiny, vit_large,
                          MODEL_SIZES, sincos_pos_embed_3d, resize_pos_embed, load_checkpoint, save_checkpoint)


def small_encoder(**kw):
    return vit_tiny(**{**dict(img_size=32, num_frames=4, depth=2), **kw})


def brute_force_pos_embed(D, grid, uniform_power):
    "The 3D sin-cos formula, one token and one channel at a time."
    gt, gh, gw = grid
    dims = [math.ceil(D / 6) * 2] * 3 if uniform_power else [D // 2, D // 4, D // 4]
    rows = []
    for t in range(gt):
        for i in range(gh):
            for j in range(gw):
                row = []
                for p, d in zip((t, i, j), dims):
                    row += [math.sin(p / 10000 ** (2 * k / d)) for k in range(d // 2)]
                    row += [math.cos(p / 10000 ** (2 * k / d)) for k in range(d // 2)]
                rows.append(row[:D])
    return torch.tensor(rows)


@pytest.mark.parametrize('D,grid,uniform', [(192, (2, 3, 4), True), (1024, (2, 2, 2), True), (64, (3, 2, 5), False), (20, (2, 2, 2), True)])
def test_pos_embed_matches_brute_force(D, grid, uniform):
    pe = sincos_pos_embed_3d(D, grid, uniform_power=uniform)
    assert pe.shape == (math.prod(grid), D)
    torch.testing.assert_close(pe, brute_force_pos_embed(D, grid, uniform).float(), atol=1e-6, rtol=0)


def test_encoder_is_fixed_pos_embed_and_published_shapes():
    with torch.device('meta'):
        enc = vit_large()
    sd = enc.state_dict()
    assert enc.grid == (8, 14, 14) and enc.num_patches == 1568
    assert sd['pos_embed'].shape == (1, 1568, 1024) and sd['patch_embed.proj.weight'].shape == (1024, 3, 2, 16, 16)
    assert sd['blocks.23.attn.qkv.weight'].shape == (3072, 1024) and sd['blocks.23.mlp.fc1.weight'].shape == (4096, 1024)
    assert 'blocks.24.norm1.weight' not in sd and sd['norm.weight'].shape == (1024,)
    assert not enc.pos_embed.requires_grad
    n_params = sum(p.numel() for p in enc.parameters() if p.requires_grad)
    assert 303_000_000 < n_params < 305_000_000                       # ViT-L/16 video: ~304M


@pytest.mark.parametrize('name', list(MODEL_SIZES))
def test_sizes(name):
    dim, depth, heads = MODEL_SIZES[name]
    with torch.device('meta'):
        enc = build_encoder(name, img_size=32, num_frames=4)
    assert (enc.embed_dim, enc.depth, enc.num_heads, len(enc.blocks)) == (dim, depth, heads, depth)
    assert enc.blocks[0].attn.num_heads == heads and enc.blocks[0].norm1.eps == 1e-6


def test_forward_shapes_and_masked_forward():
    torch.manual_seed(0)
    enc = small_encoder(img_size=(32, 48)).eval()
    assert enc.grid == (2, 2, 3)
    x = torch.randn(2, 3, 4, 32, 48)
    with torch.no_grad():
        assert enc(x).shape == (2, 12, 192)
        idx = torch.tensor([[0, 4, 7], [1, 2, 11]])
        # masked forward == the blocks run on the gathered embedded tokens (not on all tokens)
        torch.testing.assert_close(enc(x, idx), enc.encode(apply_masks(enc.embed(x), idx)))
        # with all tokens kept, the masked forward is the full forward
        torch.testing.assert_close(enc(x, torch.arange(12).expand(2, -1)), enc(x), atol=1e-5, rtol=0)
        # a list of masks gives one output per mask, each as if given alone
        outs = enc(x, [idx, idx[:, :2]])
        torch.testing.assert_close(outs[1], enc(x, idx[:, :2]))
        # pixels of dropped tubelets do not affect kept tokens; pixels of kept ones do
        x2 = x.clone(); x2[:, :, 0:2, 16:32, 16:32] += 1.      # token (t0, i1, j1) = 4: kept in sample 0 only
        d = (enc(x, idx) - enc(x2, idx)).abs().amax(dim=(1, 2))
        assert d[0] > 1e-3 and d[1] < 1e-6


def test_attention_goes_through_fused_sdpa():
    "Every encoder and predictor block calls torch's scaled_dot_product_attention once per forward."
    import unittest.mock
    enc = small_encoder().eval()
    pred = build_predictor(enc, predictor_embed_dim=48, depth=3)
    x = torch.randn(2, 3, 4, 32, 32)
    ctx, tgt = torch.tensor([[0, 1, 2], [3, 4, 5]]), torch.tensor([[6, 7], [1, 2]])
    calls, sdpa = [], torch.nn.functional.scaled_dot_product_attention
    def counting(q, *a, **kw): calls.append(tuple(q.shape)); return sdpa(q, *a, **kw)
    with unittest.mock.patch('torch.nn.functional.scaled_dot_product_attention', counting):
        enc(x); pred(enc(x, ctx), ctx, tgt)
    # (batch, heads, tokens, head_dim): full clip (8 tokens), context (3), predictor (3 context + 2 targets)
    assert calls == [(2, 3, 8, 64)] * 2 + [(2, 3, 3, 64)] * 2 + [(2, 3, 5, 16)] * 3


@pytest.mark.parametrize('checkpointing', [False, True])
def test_activation_checkpointing_recomputes_blocks_and_keeps_gradients(checkpointing):
    def run(ckpt):
        torch.manual_seed(0)
        enc = small_encoder(drop_path_rate=0.2).set_grad_checkpointing(ckpt).train()
        pred = build_predictor(enc, predictor_embed_dim=48, depth=2).set_grad_checkpointing(ckpt)
        calls = []
        for blk in [*enc.blocks, *pred.predictor_blocks]: blk.register_forward_pre_hook(lambda *a: calls.append(1))  # pre: recomputation may stop early
        x = torch.randn(2, 3, 4, 32, 32, generator=torch.Generator().manual_seed(1))
        ctx, tgt = torch.tensor([[0, 1, 2], [3, 4, 5]]), torch.tensor([[6, 7], [1, 2]])
        torch.manual_seed(2)
        pred(enc(x, ctx), ctx, tgt).square().mean().backward()
        with torch.no_grad(): enc(x)                     # no autograd: never checkpointed
        return calls, {n: q.grad for n, q in [*enc.named_parameters(), *pred.named_parameters()] if q.grad is not None}
    calls, g = run(checkpointing)
    assert len(calls) == (2 * 4 if checkpointing else 4) + 2      # recomputed in backward; + the no_grad forward
    _, ref = run(False)
    assert g.keys() == ref.keys()
    for n in ref: torch.testing.assert_close(g[n], ref[n], rtol=1e-5, atol=1e-7)


def test_apply_masks_gathers():
    x = torch.arange(2 * 5 * 3).view(2, 5, 3).float()
    idx = torch.tensor([[0, 4], [1, 3]])
    out = apply_masks(x, idx)
    for b in range(2):
        for k in range(2):
            assert torch.equal(out[b, k], x[b, idx[b, k]])
    with pytest.raises(ValueError, match='token indices'):
        apply_masks(x, idx[0])


def test_other_clip_size_resizes_pos_embed():
    enc = small_encoder(img_size=32, num_frames=4).eval()
    x = torch.randn(1, 3, 8, 64, 64)                          # grid (4, 4, 4) instead of (2, 2, 2)
    with torch.no_grad():
        assert enc(x).shape == (1, 64, 192)
    pe = resize_pos_embed(enc.pos_embed, (2, 2, 2), (4, 4, 4))
    # trilinear with align_corners=False: the corner values are the original corners
    torch.testing.assert_close(pe[0, 0], enc.pos_embed[0, 0]); torch.testing.assert_close(pe[0, -1], enc.pos_embed[0, -1])


def test_bad_inputs():
    with pytest.raises(ValueError, match='img_size'): vit_tiny(img_size=30)
    with pytest.raises(ValueError, match='num_frames'): vit_tiny(num_frames=3)
    with pytest.raises(ValueError, match='unknown model'): build_encoder('vit_xl')
    enc = small_encoder()
    with pytest.raises(ValueError, match='expected a clip'): enc(torch.randn(1, 1, 4, 32, 32))
    with pytest.raises(ValueError, match='not a multiple'): enc(torch.randn(1, 3, 4, 30, 32))
    with pytest.raises(ValueError, match='freeze'): enc.freeze_blocks(3)


def test_freeze_blocks_flags():
    enc = small_encoder(depth=3).freeze_blocks(2)
    assert not any(p.requires_grad for p in enc.patch_embed.parameters())
    assert not any(p.requires_grad for b in enc.blocks[:2] for p in b.parameters())
    assert all(p.requires_grad for p in enc.blocks[2].parameters()) and enc.norm.weight.requires_grad
    enc.freeze_blocks(0)
    assert all(p.requires_grad for n, p in enc.named_parameters() if n != 'pos_embed')


def test_predictor():
    torch.manual_seed(0)
    enc = small_encoder()
    pred = build_predictor(enc, predictor_embed_dim=48, depth=2).eval()
    assert pred.predictor_blocks[0].attn.num_heads == enc.num_heads
    assert all((t == 0).all() for t in pred.mask_tokens)       # zero-initialised
    ctx_idx, tgt_idx = torch.tensor([[0, 1, 5]]), torch.tensor([[2, 3, 7]])
    x = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        z = enc(x, ctx_idx)
        out = pred(z, ctx_idx, tgt_idx)
        assert out.shape == (1, 3, 192)
        # by hand: embed, add positions, mask tokens, blocks, norm, proj, keep the target part
        pos = pred.predictor_pos_embed[0]
        h = torch.cat([pred.predictor_embed(z[0]) + pos[ctx_idx[0]], pred.mask_tokens[0][0] + pos[tgt_idx[0]]])[None]
        for blk in pred.predictor_blocks: h = blk(h)
        torch.testing.assert_close(out, pred.predictor_proj(pred.predictor_norm(h))[:, 3:])
        # the second mask token is used for mask_index 1
        pred.mask_tokens[1].add_(1.)
        assert not torch.allclose(pred(z, ctx_idx, tgt_idx, mask_index=1), out)
        torch.testing.assert_close(pred(z, ctx_idx, tgt_idx, mask_index=0), out)


def published_file(path, enc, tgt, pred, opt):
    "A checkpoint in V-JEPA's published layout, written the way V-JEPA writes it (DDP + backbone wrapper)."
    wrap = lambda m: {'module.backbone.' + k: v for k, v in m.state_dict().items()}
    torch.save(dict(encoder=wrap(enc), predictor=wrap(pred), target_encoder=wrap(tgt), opt=opt.state_dict(),
                    scaler=None, epoch=7, loss=0.42, batch_size=4, world_size=8, lr=6.25e-4), path)


def test_load_published_layout(tmp_path):
    torch.manual_seed(0)
    enc, tgt = small_encoder(), small_encoder()
    pred = build_predictor(enc, predictor_embed_dim=48, depth=2)
    opt = torch.optim.AdamW(list(enc.parameters()) + list(pred.parameters()))
    (sum(p.sum() for p in enc.parameters()) + sum(p.sum() for p in pred.parameters())).backward(); opt.step()
    published_file(tmp_path / 'vit.pth.tar', enc, tgt, pred, opt)

    enc2, pred2 = small_encoder(), build_predictor(small_encoder(), predictor_embed_dim=48, depth=2)
    rep = load_checkpoint(tmp_path / 'vit.pth.tar', enc2, pred2)
    for part in ('encoder', 'predictor'):
        assert rep[part]['missing'] == rep[part]['unexpected'] == rep[part]['mismatched'] == rep[part]['recomputed'] == []
    assert rep['encoder']['source'] == 'target_encoder' and rep['epoch'] == 7
    for a, b in zip(tgt.state_dict().values(), enc2.state_dict().values()): assert torch.equal(a, b)
    for a, b in zip(pred.state_dict().values(), pred2.state_dict().values()): assert torch.equal(a, b)
    load_checkpoint(tmp_path / 'vit.pth.tar', enc2, which='encoder')
    for a, b in zip(enc.state_dict().values(), enc2.state_dict().values()): assert torch.equal(a, b)


def test_load_reports_differences(tmp_path):
    enc = small_encoder(depth=3)
    save_checkpoint(tmp_path / 'c.pth', enc)
    rep = load_checkpoint(tmp_path / 'c.pth', small_encoder(depth=2))       # falls back to 'encoder'
    assert rep['encoder']['source'] == 'encoder'
    assert rep['encoder']['unexpected'] == sorted(k for k in enc.state_dict() if k.startswith('blocks.2.'))
    with pytest.raises(ValueError, match=r'12 missing \[blocks\.3\.'):                # refused unless asked for
        load_checkpoint(tmp_path / 'c.pth', small_encoder(depth=4))
    rep = load_checkpoint(tmp_path / 'c.pth', small_encoder(depth=4), partial=True)
    assert rep['encoder']['missing'] == sorted(k for k in small_encoder(depth=4).state_dict() if k.startswith('blocks.3.'))
    with pytest.raises(ValueError, match='9 mis-shaped'):
        load_checkpoint(tmp_path / 'c.pth', vit_tiny(img_size=32, num_frames=4, depth=3, mlp_ratio=2.))
    rep = load_checkpoint(tmp_path / 'c.pth', vit_tiny(img_size=32, num_frames=4, depth=3, mlp_ratio=2.), partial=True)
    assert {k for k, _, _ in rep['encoder']['mismatched']} == {f'blocks.{i}.mlp.{n}' for i in range(3) for n in ('fc1.weight', 'fc1.bias', 'fc2.weight')}
    with pytest.raises(ValueError, match='unexpected'):
        load_checkpoint(tmp_path / 'c.pth', small_encoder(depth=2), strict=True)
    with pytest.raises(ValueError, match='missing'):
        load_checkpoint(tmp_path / 'c.pth', small_encoder(depth=4), strict=True)
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        load_checkpoint(tmp_path / 'nope.pth', enc)
    with pytest.raises(ValueError, match='predictor'):
        load_checkpoint(tmp_path / 'c.pth', predictor=build_predictor(enc, depth=1))


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(1)
    enc, tgt = small_encoder().eval(), small_encoder().eval()
    pred = build_predictor(enc, predictor_embed_dim=48, depth=2).eval()
    with torch.no_grad(): pred.mask_tokens[0].normal_()
    opt = torch.optim.AdamW(enc.parameters())
    path = save_checkpoint(tmp_path / 'ours.pth.tar', enc, target_encoder=tgt, predictor=pred, opt=opt, epoch=2, lr=1e-4)
    raw = torch.load(path, weights_only=True)
    assert {'encoder', 'target_encoder', 'predictor', 'opt', 'epoch', 'lr'} <= set(raw)
    assert all(k.startswith('module.backbone.') for k in raw['encoder'])
    assert [p.name for p in tmp_path.iterdir()] == ['ours.pth.tar']      # no temporary file left behind
    enc2, pred2 = small_encoder().eval(), build_predictor(small_encoder(), predictor_embed_dim=48, depth=2).eval()
    rep = load_checkpoint(path, enc2, pred2)
    assert rep['encoder']['loaded'] == len(enc.state_dict())
    x, ci, ti = torch.randn(2, 3, 4, 32, 32), torch.tensor([[0, 3]] * 2), torch.tensor([[1, 2, 6]] * 2)
    with torch.no_grad():
        assert torch.equal(enc2(x), tgt(x))
        assert torch.equal(pred2(tgt(x, ci), ci, ti), pred(tgt(x, ci), ci, ti))
    with pytest.raises(FileExistsError):
        save_checkpoint(path, enc, overwrite=False)


def test_checkpoint_must_fit_and_bad_files_name_the_file(tmp_path):
    from usjepa.model import vit_small, check_checkpoint, open_checkpoint
    path = save_checkpoint(tmp_path / 'tiny.pth.tar', vit_tiny(img_size=32, num_frames=4, depth=2))
    small = vit_small(img_size=32, num_frames=4, depth=2)
    before = {k: v.clone() for k, v in small.state_dict().items()}
    with pytest.raises(ValueError, match=r'tiny\.pth\.tar.*0 fit.*mis-shaped'):
        load_checkpoint(path, small)
    assert all(torch.equal(before[k], v) for k, v in small.state_dict().items())      # nothing half-loaded
    with torch.device('meta'):
        meta_small = vit_small(img_size=32, num_frames=4, depth=2)
        meta_tiny = vit_tiny(img_size=32, num_frames=4, depth=2)
    with pytest.raises(ValueError, match='mis-shaped'): check_checkpoint(path, meta_small)
    assert check_checkpoint(path, meta_tiny)['encoder']['loaded'] == len(meta_tiny.state_dict())
    assert check_checkpoint(path, {k: v.shape for k, v in meta_tiny.state_dict().items()})['encoder']['missing'] == []
    (tmp_path / 'notes.txt').write_text('not a checkpoint\n')
    with pytest.raises(ValueError, match=r'notes\.txt: cannot read as a PyTorch checkpoint'): load_checkpoint(tmp_path / 'notes.txt', small)
    (tmp_path / 'cut.pth').write_bytes(path.read_bytes()[:3000])
    with pytest.raises(ValueError, match=r'cut\.pth: cannot read'): load_checkpoint(tmp_path / 'cut.pth', small)
    torch.save(dict(epoch=1, probe=dict(w=torch.zeros(1))), tmp_path / 'probe.pt')
    with pytest.raises(ValueError, match=r"probe\.pt has no 'encoder'"): check_checkpoint(tmp_path / 'probe.pt', meta_tiny)
    torch.save({}, tmp_path / 'empty.pt')
    with pytest.raises(ValueError, match='empty dict'): open_checkpoint(tmp_path / 'empty.pt')
