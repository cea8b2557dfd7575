"""Our RoPE encoder, masked-context encoder and predictor against the public V-JEPA 2 code (facebookresearch/vjepa2).

The reference is not part of the project and CI has no network, so every test here is skipped unless the V-JEPA 2
sources are on disk: set `VJEPA2_SRC` to a checkout (default `/tmp/vjepa2`), e.g.

    git clone https://github.com/facebookresearch/vjepa2 /tmp/vjepa2      # or: git archive of any copy
    VJEPA2_SRC=/tmp/vjepa2 pytest -q tests/test_vjepa2_reference.py
    VJEPA2_SRC=/tmp/vjepa2 python tests/test_vjepa2_reference.py           # prints the max abs differences

Tiny random models of the reference are built with its own code, saved in its checkpoint layout (a dict of
`encoder`, `predictor`, `target_encoder`, `opt`, ... with `module.backbone.` prefixes, no `pos_embed` for RoPE)
and read with the project's one loader, which must fit every tensor; then the outputs are compared in fp32.
"""
import os, sys, unittest.mock, warnings
from functools import partial
from pathlib import Path

import pytest, torch
import torch.nn as nn

from usjepa.model import build_encoder, build_predictor, MODEL_SIZES
from usjepa.checkpoints import load_checkpoint

REF = Path(os.environ.get('VJEPA2_SRC', '/tmp/vjepa2'))
HAVE_REF = (REF / 'src' / 'models' / 'vision_transformer.py').is_file()
pytestmark = pytest.mark.skipif(not HAVE_REF, reason=f"V-JEPA 2 reference code not found at {REF} (set VJEPA2_SRC)")
TOL = 1e-4

# a tiny model: 8 frames of 48x48 pixels in 16-pixel patches -> grid (4, 3, 3); encoder 96 wide (3 heads of 32 channels:
# 10 per axis turned, 2 not), predictor 48 wide (3 heads of 16: 4 per axis, 4 not). The encoder is also compared on a
# non-square model (48x32 pixels, grid (4, 3, 2)); the reference's predictor assumes a square grid (its positions use
# grid_size = height for both axes), ours uses the true one, so the predictor is compared on square grids only.
GEOM = dict(img_size=(48, 48), num_frames=8, patch_size=16, tubelet_size=2)
ENC = dict(embed_dim=96, depth=3, num_heads=3, mlp_ratio=4.)
PRED = dict(predictor_embed_dim=48, depth=2)


def reference():
    "The reference's modules (its own code, imported from `REF`)."
    if str(REF) not in sys.path: sys.path.insert(0, str(REF))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        from src.models.vision_transformer import VisionTransformer, vit_giant_xformers_rope, vit_large_rope
        from src.models.predictor import VisionTransformerPredictor
    return VisionTransformer, VisionTransformerPredictor, vit_giant_xformers_rope, vit_large_rope


def randomise(model, seed):
    "Every parameter random (LayerNorms around 1, mask tokens included), so that no zero hides a wrong mapping."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + float(p.ndim == 1 and n.endswith('weight') and 'norm' in n))
    return model.eval()


def build_reference(img_size=GEOM['img_size'], out_layers=None):
    VisionTransformer, Predictor, _, _ = reference()
    ln = partial(nn.LayerNorm, eps=1e-6)
    enc = VisionTransformer(img_size=img_size, patch_size=16, num_frames=8, tubelet_size=2, use_rope=True, qkv_bias=True,
                            norm_layer=ln, out_layers=out_layers, **ENC)
    pred = Predictor(img_size=img_size, patch_size=16, num_frames=8, tubelet_size=2, embed_dim=ENC['embed_dim'],
                     predictor_embed_dim=PRED['predictor_embed_dim'], depth=PRED['depth'], num_heads=ENC['num_heads'],
                     use_rope=True, use_mask_tokens=True, num_mask_tokens=2, qkv_bias=True, norm_layer=ln)
    return randomise(enc, 0), randomise(pred, 1)


def save_reference_checkpoint(path, enc, pred, target):
    "A file as V-JEPA 2's `app/vjepa/train.py` writes it: DDP(MultiSeqWrapper(model)) state dicts and plain values."
    wrap = lambda m: {f'module.backbone.{k}': v for k, v in m.state_dict().items()}
    opt = torch.optim.AdamW(list(enc.parameters()) + list(pred.parameters()))
    torch.save(dict(encoder=wrap(enc), predictor=wrap(pred), opt=opt.state_dict(), scaler=None, target_encoder=wrap(target),
                    epoch=3, loss=0.5, batch_size=2, world_size=1, lr=1e-4), path)
    return path


def ours(img_size=GEOM['img_size']):
    enc = build_encoder('vit_tiny', **{**GEOM, 'img_size': img_size}, **ENC, pos_embed='rope').eval()
    return enc, build_predictor(enc, **PRED).eval()


def masks(seed=0, n=36, n_ctx=9, n_tgt=7, batch=2):
    "Per sample: sorted context indices and sorted target indices, disjoint (as V-JEPA's collator gives them)."
    g = torch.Generator().manual_seed(seed)
    perms = [torch.randperm(n, generator=g) for _ in range(batch)]
    ctx = torch.stack([p[:n_ctx].sort().values for p in perms])
    tgt = torch.stack([p[n_ctx:n_ctx + n_tgt].sort().values for p in perms])
    return ctx, tgt


def differences(tmp_path):
    "Max abs differences ours vs reference: full encoder, masked-context encoder (2 masks), predictor, multi-layer outputs."
    ref_enc, ref_pred = build_reference()
    ref_target = randomise(build_reference()[0], 2)
    f = save_reference_checkpoint(Path(tmp_path) / 'vjepa2_tiny.pth.tar', ref_enc, ref_pred, ref_target)
    enc, pred = ours()
    rep = load_checkpoint(f, enc, pred, which='encoder', strict=True)
    for part in ('encoder', 'predictor'):
        assert rep[part]['missing'] == rep[part]['unexpected'] == rep[part]['mismatched'] == [], rep[part]
        assert rep[part]['loaded'] == len((enc if part == 'encoder' else pred).state_dict())
    x = torch.randn(2, 3, 8, 48, 48, generator=torch.Generator().manual_seed(5))
    (c1, t1), (c2, t2) = masks(0), masks(1)
    d = {}
    with torch.no_grad():
        d['encoder'] = (enc(x) - ref_enc(x)).abs().max().item()
        ref_ctx = ref_enc(x, masks=[c1, c2])                       # the reference concatenates the masks along the batch
        d['masked encoder'] = (torch.cat(enc(x, [c1, c2])) - ref_ctx).abs().max().item()
        z1 = ref_enc(x, masks=[c1])
        d['predictor'] = max((pred(z1, c1, t1, mask_index=i) - ref_pred(z1, [c1], [t1], mask_index=i)).abs().max().item()
                             for i in (0, 1))
        ref_ml, _ = build_reference(out_layers=[0, 2])
        ref_ml.load_state_dict(ref_enc.state_dict())
        d['out_layers'] = max((a - b).abs().max().item() for a, b in zip(enc(x, out_layers=[0, 2]), ref_ml(x)))
    # the target encoder entry is the default, and it is the third model's weights
    enc_t, _ = ours()
    load_checkpoint(f, enc_t)
    with torch.no_grad(): d['target encoder'] = (enc_t(x) - ref_target(x)).abs().max().item()
    # a non-square clip (grid (4, 3, 2)), full and masked
    ref_ns, _ = build_reference(img_size=(48, 32))
    enc_ns, _ = ours(img_size=(48, 32))
    enc_ns.load_state_dict(ref_ns.state_dict())
    xn, (cn, _) = torch.randn(2, 3, 8, 48, 32, generator=torch.Generator().manual_seed(6)), masks(2, n=24, n_ctx=10)
    with torch.no_grad():
        d['non-square enc'] = max((enc_ns(xn) - ref_ns(xn)).abs().max().item(),
                                  (enc_ns(xn, cn) - ref_ns(xn, masks=[cn])).abs().max().item())
    return d


def test_outputs_match_the_reference(tmp_path):
    d = differences(tmp_path)
    assert all(v <= TOL for v in d.values()), d


def test_predictor_with_other_mask_sizes(tmp_path):
    "Few context tokens and many targets (the long-range generator's shape): still the same predictions."
    ref_enc, ref_pred = build_reference()
    enc, pred = ours()
    f = save_reference_checkpoint(Path(tmp_path) / 'sq.pth.tar', ref_enc, ref_pred, ref_enc)
    load_checkpoint(f, enc, pred, strict=True)
    x = torch.randn(1, 3, 8, 48, 48, generator=torch.Generator().manual_seed(7))
    c, t = masks(3, n=36, n_ctx=5, n_tgt=30, batch=1)
    with torch.no_grad():
        z = ref_enc(x, masks=[c])
        assert (pred(z, c, t, 1) - ref_pred(z, [c], [t], mask_index=1)).abs().max() <= TOL


def test_published_sizes_have_the_reference_layout():
    "V-JEPA 2's ViT-L/16 and ViT-g/16 (256 px, 16 frames) and its 384x12 predictor: the same names and shapes, on the meta device."
    VisionTransformer, Predictor, vit_g, vit_l = reference()
    linspace = torch.linspace                     # the reference reads its drop-path rates with .item(): keep them on the CPU
    cpu_linspace = lambda *a, **kw: linspace(*a, **{**kw, 'device': 'cpu'})
    for name, ref_fn in (('vit_large', vit_l), ('vit_giant', vit_g)):
        with torch.device('meta'), unittest.mock.patch.object(torch, 'linspace', cpu_linspace):
            ref = ref_fn(img_size=(256, 256), num_frames=16)
            mine = build_encoder(name, img_size=256, num_frames=16, pos_embed='rope')
            ref_p = Predictor(img_size=(256, 256), patch_size=16, num_frames=16, tubelet_size=2, embed_dim=ref.embed_dim,
                              predictor_embed_dim=384, depth=12, num_heads=12, use_rope=True, use_mask_tokens=True,
                              num_mask_tokens=2, norm_layer=partial(nn.LayerNorm, eps=1e-6))
            mine_p = build_predictor(mine, predictor_embed_dim=384, depth=12, num_heads=12)
        shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}
        assert shapes(mine) == shapes(ref), name
        assert mine_p.predictor_blocks[0].attn.num_heads == ref_p.predictor_blocks[0].attn.num_heads == 12
        assert shapes(mine_p) == shapes(ref_p), name
        assert ref.blocks[0].norm1.eps == mine.blocks[0].norm1.eps == 1e-6
    assert MODEL_SIZES['vit_giant'] == (1408, 40, 22)


if __name__ == '__main__':
    import tempfile
    if not HAVE_REF: sys.exit(f"no V-JEPA 2 code at {REF}: set VJEPA2_SRC")
    torch.set_default_dtype(torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        for k, v in differences(tmp).items(): print(f"{k:16s} max abs diff {v:.2e}")
