"Tests for usjepa.probe: shapes, frozen encoder, feature cache, loss masking, overfitting a tiny batch."
import copy
import pytest
import torch
import torch.nn.functional as F
from usjepa.model import VisionTransformer
from usjepa.probe import (AttentiveProbe, ConvDecoder, FeatureCache, SegmentationHead, InMemoryClips, evaluate,
                          frozen_features, predict, seg_loss, split_patch, train_probe)


def tiny_encoder(patch=8, img=32, frames=4, depth=2):
    torch.manual_seed(0)
    return VisionTransformer(img_size=img, num_frames=frames, patch_size=patch, embed_dim=48, depth=depth, num_heads=3)


def clips(n=4, T=4, H=32, W=32, seed=0):
    "Random clips whose labels depend on the content (intensity bands), so a probe can learn them."
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(n, 3, T, H, W, generator=g)
    smooth = F.avg_pool3d(video.mean(1, keepdim=True), (1, 5, 5), 1, (0, 2, 2))[:, 0]
    labels = torch.bucketize(smooth, torch.tensor([-0.2, 0.0, 0.2]))
    return InMemoryClips(video, labels)


@pytest.mark.parametrize('patch,img', [(16, 64), (8, 32)])
def test_shapes(patch, img):
    enc = tiny_encoder(patch=patch, img=img, depth=1)
    head = SegmentationHead.from_encoder(enc, probe_dim=32, num_heads=4)
    x = torch.randn(2, 3, 4, img, img)
    feats = frozen_features(enc, x)
    assert feats.shape == (2, enc.num_patches, 48) and not feats.requires_grad
    assert head.probe(feats).shape == (2, enc.num_patches, 32)
    assert head(feats).shape == (2, 4, 4, img, img)
    assert predict(head, x, encoder=enc).shape == (2, 4, img, img)
    # exactly two transposed convolutions, together 2x in time and `patch`x in space
    convs = [m for m in head.modules() if isinstance(m, torch.nn.ConvTranspose3d)]
    assert len(convs) == 2
    s = [c.stride for c in convs]
    assert (s[0][0] * s[1][0], s[0][1] * s[1][1], s[0][2] * s[1][2]) == (2, patch, patch)


def test_decoder_layout_matches_token_order():
    "Token n = t*gh*gw + i*gw + j must land on frames 2t..2t+1, rows i*p.., cols j*p.. (brute-force check)."
    grid, p = (2, 3, 4), 4
    dec = ConvDecoder(grid, probe_dim=8, num_classes=4, tubelet=2, patch=p)
    z = torch.zeros(1, 24, 8)
    for n in range(24):
        out0 = dec(z)
        zn = z.clone(); zn[0, n] = torch.randn(8)
        changed = (dec(zn) - out0).abs().sum((0, 1)) > 1e-6          # (T, H, W) pixels that moved
        t, i, j = n // 12, (n // 4) % 3, n % 4
        expect = torch.zeros(4, 12, 16, dtype=torch.bool)
        expect[2 * t:2 * t + 2, i * p:(i + 1) * p, j * p:(j + 1) * p] = True
        # GroupNorm couples pixels through its statistics: compare after removing it
        dec.norm = torch.nn.Identity()
        changed = (dec(zn) - dec(z)).abs().sum((0, 1)) > 1e-6
        assert torch.equal(changed, expect), n


def test_split_patch():
    for p in (4, 8, 14, 16, 32):
        a, b = split_patch(p)
        assert a * b == p and a <= b
    assert split_patch(16) == (4, 4)


def test_probe_rejects_bad_tokens():
    probe = AttentiveProbe((2, 2, 2), embed_dim=48, probe_dim=32, num_heads=4)
    with pytest.raises(ValueError, match='expected tokens'):
        probe(torch.randn(1, 8, 40))
    with pytest.raises(ValueError, match='divisible'):
        AttentiveProbe((2, 2, 2), embed_dim=48, probe_dim=30, num_heads=4)


def test_encoder_frozen_during_training():
    enc = tiny_encoder(); enc.train()
    before = copy.deepcopy(enc.state_dict())
    head = SegmentationHead.from_encoder(enc, probe_dim=32, num_heads=4)
    head_before = copy.deepcopy(head.state_dict())
    hist = train_probe(head, clips(4), epochs=2, batch_size=2, encoder=enc, progress=False)
    assert len(hist['loss']) == 2
    assert not enc.training and all(not p.requires_grad and p.grad is None for p in enc.parameters())
    assert all(torch.equal(v, enc.state_dict()[k]) for k, v in before.items())
    assert any(not torch.equal(v, head.state_dict()[k]) for k, v in head_before.items())   # the head did learn


def test_cache_equals_recomputed(tmp_path):
    enc = tiny_encoder()
    ds = clips(5)
    cache = FeatureCache(enc, ds, batch_size=2, dtype=torch.float32, progress=False)
    ref = frozen_features(enc, torch.stack([ds[i]['video'] for i in range(5)]))
    assert len(cache) == 5
    for i in range(5):
        item = cache[i]
        torch.testing.assert_close(item['features'], ref[i], rtol=1e-5, atol=1e-5)
        assert torch.equal(item['labels'], ds[i]['labels']) and item['patient'] == f'clip{i:04d}'
    half = FeatureCache(enc, ds, dtype=torch.float16, progress=False)
    torch.testing.assert_close(half[0]['features'], ref[0], rtol=1e-2, atol=1e-2)
    # on disk: written once, reloaded (memory-mapped) without the encoder running again
    path = tmp_path / 'feats.pt'
    FeatureCache(enc, ds, dtype=torch.float32, path=path, progress=False)
    calls = []
    h = enc.register_forward_hook(lambda *a: calls.append(1))
    again = FeatureCache(enc, ds, dtype=torch.float32, path=path, progress=False)
    h.remove()
    assert not calls and torch.equal(again[3]['features'], cache[3]['features'])
    # a different encoder must not silently reuse (or overwrite) the file
    other = tiny_encoder(); torch.nn.init.normal_(other.patch_embed.proj.weight)
    with pytest.raises(ValueError, match='different'):
        FeatureCache(other, ds, dtype=torch.float32, path=path, progress=False)
    with pytest.raises(FileNotFoundError):
        FeatureCache(enc, ds, path=tmp_path / 'nope' / 'f.pt', progress=False)


def test_loss_ignores_padded_frames():
    logits = torch.randn(2, 4, 3, 5, 5)
    labels = torch.randint(0, 4, (2, 3, 5, 5))
    valid = torch.tensor([[True, True, False], [True, False, False]])
    sel = [(0, 0), (0, 1), (1, 0)]
    ref = torch.cat([F.cross_entropy(logits[b, :, t][None], labels[b, t][None], reduction='none').flatten()
                     for b, t in sel]).mean()
    torch.testing.assert_close(seg_loss(logits, labels, valid), ref)
    with pytest.raises(ValueError, match='do not match'):
        seg_loss(logits, labels[..., :4])


def test_probe_overfits_tiny_batch():
    from usjepa.data import normalise
    from usjepa.phantom import make_sequence
    seq = make_sequence(0, n_frames=4, size=(32, 32))
    ds = InMemoryClips(normalise(seq['video'])[None], torch.from_numpy(seq['labels']).long()[None])
    enc = tiny_encoder()
    cache = FeatureCache(enc, ds, progress=False)
    torch.manual_seed(0)
    head = SegmentationHead.from_encoder(enc, probe_dim=32, num_heads=4)
    hist = train_probe(head, cache, epochs=60, lr=3e-3, batch_size=1, progress=False)
    assert hist['loss'][-1] < 0.5 * hist['loss'][0], hist['loss'][::10]
    assert hist['lr'][0] == pytest.approx(3e-3) and hist['lr'][-1] < 1e-5     # cosine to 0
    m = evaluate(head, cache, progress=False)
    assert len(m) == 4 and m.ids[0] == ('clip0000', '4CH', 0)


def test_bad_batches():
    enc = tiny_encoder()
    head = SegmentationHead.from_encoder(enc, probe_dim=32, num_heads=4)
    with pytest.raises(ValueError, match='encoder'):
        train_probe(head, clips(2), epochs=1, progress=False)     # raw video but no encoder
    with pytest.raises(ValueError, match='epochs'):
        train_probe(head, clips(2), epochs=0, progress=False)
