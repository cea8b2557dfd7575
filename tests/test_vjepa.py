import math
import pytest
import torch
import torch.nn.functional as F
from usjepa.model import vit_tiny, build_predictor
from usjepa.masking import vjepa_masks
from usjepa.vjepa import VJEPA, JEPAOutput, pretrain_step, param_groups, warmup_cosine, cosine, ema_schedule, schedule_at


def tiny(seed=0, freeze=0, depth=2):
    torch.manual_seed(seed)
    enc = vit_tiny(img_size=32, num_frames=8, depth=depth).freeze_blocks(freeze)
    return VJEPA(enc, build_predictor(enc, predictor_embed_dim=48, depth=2))


def batch(model, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, 8, 32, 32, generator=g), vjepa_masks(B, model.grid, g)


def test_loss_by_hand_and_target_encoder_runs_once():
    model = tiny()
    video, masks = batch(model)
    calls = {'target': 0, 'embed': 0}
    model.target_encoder.register_forward_hook(lambda *a: calls.__setitem__('target', calls['target'] + 1))
    model.encoder.patch_embed.register_forward_hook(lambda *a: calls.__setitem__('embed', calls['embed'] + 1))
    out = model(video, masks)
    assert isinstance(out, JEPAOutput) and calls == {'target': 1, 'embed': 1}    # once per clip for 2 generators
    with torch.no_grad():
        h = model.target_encoder(video)
        h = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-5)
        expected = []
        for i, (c, t) in enumerate(masks):
            p = model.predictor(model.encoder(video, c), c, t, i)
            torch.testing.assert_close(out.preds[i], p)
            assert torch.equal(out.tgt_idx[i], t)
            expected.append(torch.stack([(p[b] - h[b, t[b]]).abs().mean() for b in range(len(t))]).mean())
    torch.testing.assert_close(out.loss, torch.stack(expected).mean(), rtol=1e-5, atol=1e-6)


def test_overfits_one_batch():
    model = tiny()
    video, masks = batch(model)
    opt = torch.optim.AdamW(param_groups(model, 0.04))
    losses = [pretrain_step(model, video, masks, opt, lr=5e-3, wd=0.04, momentum=0.99)['loss'] for _ in range(40)]
    assert losses[-1] < 0.6 * losses[0], losses


def test_target_no_grad_and_ema_formula():
    model = tiny()
    video, masks = batch(model)
    opt = torch.optim.AdamW(param_groups(model, 0.04))
    assert not any(p.requires_grad for p in model.target_encoder.parameters())
    assert not {id(p) for p in model.target_encoder.parameters()} & {id(p) for g in opt.param_groups for p in g['params']}
    pretrain_step(model, video, masks, opt, lr=1e-3, wd=0.04, momentum=0.9)  # encoder and target now differ
    m = 0.75
    t0 = [p.clone() for p in model.target_encoder.parameters()]
    pretrain_step(model, video, masks, opt, lr=1e-3, wd=0.04, momentum=m)
    assert all(p.grad is None for p in model.target_encoder.parameters())
    e1 = [p.detach() for p in model.encoder.parameters()]
    for name, t_new, t_old, e in zip(dict(model.target_encoder.named_parameters()), model.target_encoder.parameters(), t0, e1):
        if name == 'pos_embed': assert torch.equal(t_new, t_old); continue
        torch.testing.assert_close(t_new, m * t_old + (1 - m) * e, rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(a, b) for a, b in zip(model.target_encoder.parameters(), t0))
    # momentum 1: the target does not move at all, even though the encoder does
    t0 = [p.clone() for p in model.target_encoder.parameters()]
    e0 = [p.clone() for p in model.encoder.parameters()]
    pretrain_step(model, video, masks, opt, lr=1e-3, wd=0.04, momentum=1.0)
    assert all(torch.equal(a, b) for a, b in zip(model.target_encoder.parameters(), t0))
    assert any(not torch.equal(a, b) for a, b in zip(model.encoder.parameters(), e0))


def test_frozen_blocks_bit_identical():
    model = tiny(freeze=1, depth=3)
    with torch.no_grad():     # as after loading a published file: the target differs from the encoder
        for p in model.target_encoder.parameters(): p.add_(0.01 * torch.randn_like(p))
    video, masks = batch(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(param_groups(model, 0.04))
    for _ in range(3): pretrain_step(model, video, masks, opt, lr=1e-3, wd=0.04, momentum=0.9)
    after = model.state_dict()
    frozen = [k for k in before if k.split('.')[1] == 'patch_embed' or k.split('.')[1:3] == ['blocks', '0']]
    assert len(frozen) == 2 * (2 + 12)
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    for part in ('encoder', 'target_encoder'):
        for blk in ('1', '2'):
            assert not torch.equal(before[f'{part}.blocks.{blk}.attn.qkv.weight'], after[f'{part}.blocks.{blk}.attn.qkv.weight'])


def test_param_groups_and_weight_decay_schedule():
    model = tiny()
    groups = param_groups(model, 0.04)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = [names[id(p)] for p in groups[0]['params']], [names[id(p)] for p in groups[1]['params']]
    assert all(not n.endswith('bias') and dict(model.named_parameters())[n].ndim > 1 for n in decay)
    assert 'encoder.blocks.0.norm1.weight' in no_decay and 'predictor.predictor_embed.bias' in no_decay
    assert 'predictor.mask_tokens.0' in decay and not any('pos_embed' in n or 'target_encoder' in n for n in decay + no_decay)
    opt = torch.optim.AdamW(groups)
    video, masks = batch(model)
    pretrain_step(model, video, masks, opt, lr=3e-4, wd=0.3, momentum=0.99)
    assert [g['weight_decay'] for g in opt.param_groups] == [0.3, 0.] and all(g['lr'] == 3e-4 for g in opt.param_groups)


def test_lam_and_aux():
    model = tiny()
    video, masks = batch(model)
    opt = torch.optim.AdamW(param_groups(model, 0.04))

    class Never(torch.nn.Module):
        def forward(self, out, model): raise AssertionError('aux computed with lam=1')
    r = pretrain_step(model, video, masks, opt, lr=1e-4, wd=0.04, momentum=0.99, aux=Never(), lam=1.0)
    assert r['loss'] == r['loss_jepa'] and math.isnan(r['loss_aux'])

    class Aux(torch.nn.Module):       # the auxiliary loss is a module: its parameters are the aux part
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(192, 1)
        def forward(self, out, model): return sum(self.head(p).pow(2).mean() for p in out.preds) / len(out.preds)
    aux = Aux()
    head = aux.head
    with pytest.raises(ValueError, match='does not hold'):   # its parameters must be in the optimizer
        pretrain_step(model, video, masks, opt, lr=1e-3, wd=0.04, momentum=0.99, aux=aux, lam=0.25)
    with pytest.raises(ValueError, match='nn.Module'):
        pretrain_step(model, video, masks, opt, lr=1e-3, wd=0.04, momentum=0.99, aux=lambda out, m: out.loss, lam=0.25)
    opt = torch.optim.AdamW(param_groups(model, 0.04) + param_groups(head, 0.04))
    w0 = head.weight.clone()
    r = pretrain_step(model, video, masks, opt, lr=1e-3, wd=0.04, momentum=0.99, aux=aux, lam=0.25)
    assert math.isclose(r['loss'], 0.25 * r['loss_jepa'] + 0.75 * r['loss_aux'], rel_tol=1e-5)
    assert not torch.equal(head.weight, w0)                        # the aux head trains through the same optimizer
    with pytest.raises(ValueError, match='aux'):
        pretrain_step(model, video, masks, opt, lr=1e-3, wd=0.04, momentum=0.99, lam=0.5)
    with pytest.raises(ValueError, match='lam'):
        pretrain_step(model, video, masks, opt, lr=1e-3, wd=0.04, momentum=0.99, aux=aux, lam=1.5)


def _norm(params):
    grads = [p.grad for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()


def test_grad_clipping_per_module_as_vjepa():
    # reference: the same step's gradients without clipping (lr=0, so the weights do not move)
    model = tiny()
    video, masks = batch(model)
    opt = torch.optim.SGD(param_groups(model, 0.), lr=0.)
    r0 = pretrain_step(model, video, masks, opt, lr=0., wd=0., momentum=1.)
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    enc0, pred0 = _norm(model.encoder.parameters()), _norm(model.predictor.parameters())
    assert math.isclose(r0['grad_norm_enc'], enc0, rel_tol=1e-5) and math.isclose(r0['grad_norm_pred'], pred0, rel_tol=1e-5)
    assert math.isclose(r0['grad_norm'], math.hypot(enc0, pred0), rel_tol=1e-5) and math.isnan(r0['grad_norm_aux'])
    # clip between the two norms: only the larger part is scaled, each part on its own (not one joint clip)
    clip = (enc0 + pred0) / 2
    r = pretrain_step(model, video, masks, opt, lr=0., wd=0., momentum=1., clip_grad=clip)
    assert r['grad_norm_enc'] == pytest.approx(enc0, rel=1e-5) and r['grad_norm_pred'] == pytest.approx(pred0, rel=1e-5)
    big, small = ('encoder', 'predictor') if enc0 > pred0 else ('predictor', 'encoder')
    for n, p in model.named_parameters():
        if p.grad is None: continue
        scale = clip / max(enc0, pred0) if n.startswith(big) else 1.
        torch.testing.assert_close(p.grad, ref[n] * scale, rtol=1e-4, atol=1e-9)
    assert _norm(getattr(model, big).parameters()) == pytest.approx(clip, rel=1e-4)


def test_grad_clipping_with_aux_and_frozen_blocks():
    from usjepa.localization import LocalizationLoss
    model = tiny(freeze=1)
    video, masks = batch(model)
    aux = LocalizationLoss(model.encoder.embed_dim, n_pairs=8)
    opt = torch.optim.SGD(param_groups(model, 0.) + param_groups(aux, 0.), lr=0.)
    r = pretrain_step(model, video, masks, opt, lr=0., wd=0., momentum=1., aux=aux, lam=0.5, clip_grad=1e-5)
    for part, key in ((model.encoder, 'enc'), (model.predictor, 'pred'), (aux, 'aux')):
        n = r['grad_norm_' + key]                                   # torch scales by clip / (norm + 1e-6)
        assert n > 1e-5 and _norm(part.parameters()) == pytest.approx(1e-5 * n / (n + 1e-6), rel=1e-4)
    assert all(p.grad is None for p in model.encoder.blocks[0].parameters())       # frozen: no gradient at all
    assert r['grad_norm'] == pytest.approx(math.sqrt(r['grad_norm_enc'] ** 2 + r['grad_norm_pred'] ** 2 + r['grad_norm_aux'] ** 2), rel=1e-5)


def test_bf16_autocast_runs_on_cpu():
    model = tiny()
    video, masks = batch(model)
    opt = torch.optim.AdamW(param_groups(model, 0.04))
    r = pretrain_step(model, video, masks, opt, lr=1e-4, wd=0.04, momentum=0.99, amp_dtype=torch.bfloat16)
    assert math.isfinite(r['loss']) and all(p.dtype == torch.float32 for p in model.parameters())


def test_schedules():
    total, warm = 1000, 100
    lrs = [warmup_cosine(s, total, warm, 2e-4, 6.25e-4, 1e-6) for s in range(total + 1)]
    assert lrs[0] == 2e-4 and math.isclose(lrs[warm], 6.25e-4) and math.isclose(lrs[-1], 1e-6)
    assert all(a <= b for a, b in zip(lrs[:warm], lrs[1:warm + 1])) and all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1:]))
    # halfway through the cosine part the lr is the mean of ref and final
    assert math.isclose(lrs[warm + (total - warm) // 2], (6.25e-4 + 1e-6) / 2, rel_tol=1e-9)
    assert math.isclose(cosine(0, total, 0.04, 0.4), 0.04) and math.isclose(cosine(total, total, 0.04, 0.4), 0.4)
    assert math.isclose(cosine(total // 2, total, 0.04, 0.4), 0.22)
    assert ema_schedule(0, total) == 0.998 and ema_schedule(total, total) == 1.0 and math.isclose(ema_schedule(250, total), 0.9985)
    assert ema_schedule(2 * total, total) == 1.0


def test_ipe_scale_matches_reference_formulas():
    # V-JEPA's schedules span int(ipe_scale * epochs * ipe) iterations; training stops after epochs * ipe
    ipe, epochs, warmup_ep, scale = 20, 8, 2, 1.25
    total, W, T = ipe * epochs, ipe * warmup_ep, int(scale * ipe * epochs)
    lr0, lr1, lr2, wd0, wd1, e0, e1 = 1e-4, 1e-3, 1e-6, 0.04, 0.4, 0.998, 1.0
    for itr in (0, total // 2, total - 1):
        s = itr + 1                       # the reference steps its lr/wd schedulers before the update
        lr = lr0 + s / W * (lr1 - lr0) if s < W else lr2 + (lr1 - lr2) * 0.5 * (1 + math.cos(math.pi * (s - W) / (T - W)))
        wd = wd1 + (wd0 - wd1) * 0.5 * (1 + math.cos(math.pi * s / T))
        m = e0 + itr * (e1 - e0) / (ipe * epochs * scale)
        got = schedule_at(itr, total, W, start_lr=lr0, ref_lr=lr1, final_lr=lr2, wd=wd0, final_wd=wd1, ema=(e0, e1), ipe_scale=scale)
        assert got == pytest.approx(dict(lr=lr, wd=wd, momentum=m), rel=1e-12)
    assert warmup_cosine(total, total, W, lr0, lr1, lr2, ipe_scale=scale) > 10 * lr2      # not at the end yet
    assert cosine(total, total, wd0, wd1, ipe_scale=scale) < wd1 and ema_schedule(total, total, ipe_scale=scale) < 1.0
    assert warmup_cosine(total, total, W, lr0, lr1, lr2) == pytest.approx(lr2)             # default 1.0: today's
    with pytest.raises(ValueError, match='ipe_scale'): cosine(1, total, wd0, wd1, ipe_scale=0)
