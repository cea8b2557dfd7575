"VideoMAE baseline (usjepa.videomae) against Hugging Face `transformers`' VideoMAE, and its training and loading behaviour."
import pytest, torch
import transformers
from transformers import VideoMAEConfig, VideoMAEForPreTraining, VideoMAEModel

from usjepa.data import normalise
from usjepa.masking import tube_mask
from usjepa.phantom import make_sequence
from usjepa.videomae import (VideoMAE, VideoMAEEncoder, build_videomae, hf_to_videomae, load_videomae, masked_mse,
                             normalise_tubelets, save_videomae, tubelet_pixels, videomae_param_groups, videomae_step)

# a small random VideoMAE: image 32, 4 frames, tubelets 2x16x16 -> grid (2, 2, 2); hidden 64, 2 layers, 2 heads
HF = dict(image_size=32, patch_size=16, num_channels=3, num_frames=4, tubelet_size=2, hidden_size=64, num_hidden_layers=2,
          num_attention_heads=2, intermediate_size=256, use_mean_pooling=False, layer_norm_eps=1e-6, decoder_hidden_size=32,
          decoder_num_hidden_layers=2, decoder_num_attention_heads=2, decoder_intermediate_size=128, norm_pix_loss=True)
OURS = dict(img_size=32, num_frames=4, patch_size=16, tubelet_size=2, in_chans=3, embed_dim=64, depth=2, num_heads=2)

def randomise(model, seed=0):
    "Every parameter random (q/v biases, LayerNorms and mask token included), so that no zero hides a wrong mapping."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():   # LayerNorm scales around 1, everything else around 0
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + float(p.ndim == 1 and n.endswith('weight')))
    return model.eval()

def hf_video(video): return video.permute(0, 2, 1, 3, 4)        # ours (B, C, T, H, W) -> transformers (B, T, C, H, W)

def masks_of(bool_masked):
    "transformers' bool_masked_pos (B, N) -> our (visible_idx, masked_idx)."
    idx = torch.arange(bool_masked.shape[1]).expand(len(bool_masked), -1)
    return idx[~bool_masked].view(len(idx), -1), idx[bool_masked].view(len(idx), -1)

@pytest.fixture(scope='module')
def clip(): return torch.randn(2, 3, 4, 32, 32, generator=torch.Generator().manual_seed(1))

def test_encoder_matches_transformers_videomae_model(clip):
    hf = randomise(VideoMAEModel(VideoMAEConfig(**HF)))
    ours = VideoMAEEncoder(**OURS).eval()
    rep = load_videomae(hf.state_dict(), ours)
    assert rep['layout'] == 'huggingface' and not rep['missing'] and not rep['unexpected'] and not rep['mismatched']
    with torch.no_grad():
        full = (ours(clip) - hf(hf_video(clip)).last_hidden_state).abs().max()
        bool_masked = torch.tensor([[1, 0, 1, 0, 1, 0, 1, 0], [0, 1, 1, 0, 0, 1, 1, 0]], dtype=torch.bool)
        vis, _ = masks_of(bool_masked)
        visible = (ours(clip, vis) - hf(hf_video(clip), bool_masked_pos=bool_masked).last_hidden_state).abs().max()
    assert full <= 1e-5 and visible <= 1e-5, (full, visible)

def test_pretraining_model_matches_transformers_videomae_for_pretraining(clip):
    hf = randomise(VideoMAEForPreTraining(VideoMAEConfig(**HF)), seed=1)
    hf.decoder.norm.eps = 1e-6                    # transformers builds this one norm with torch's default eps 1e-5; VideoMAE uses 1e-6
    ours = VideoMAE(VideoMAEEncoder(**OURS), decoder_dim=32, decoder_depth=2, decoder_heads=2).eval()
    rep = load_videomae(hf.state_dict(), ours)
    assert not rep['missing'] and not rep['unexpected'] and not rep['mismatched']
    vis, msk = tube_mask(2, ours.grid, 0.5, torch.Generator().manual_seed(0))
    bool_masked = torch.zeros(2, 8, dtype=torch.bool).scatter_(1, msk, True)
    with torch.no_grad():
        theirs, out = hf(hf_video(clip), bool_masked_pos=bool_masked), ours(clip, (vis, msk))
    assert (out.pred - theirs.logits).abs().max() <= 1e-5
    assert abs(out.loss - theirs.loss) <= 1e-5 * max(1., theirs.loss.item())

def test_original_release_layout_round_trip(tmp_path, clip):
    "An 'original .pth' built by renaming a transformers model's weights to the release's documented key names."
    hf = randomise(VideoMAEForPreTraining(VideoMAEConfig(**HF)), seed=2)
    hf.decoder.norm.eps = 1e-6
    original = hf_to_videomae(hf.state_dict())
    documented = ['encoder.patch_embed.proj.weight', 'encoder.blocks.0.attn.qkv.weight', 'encoder.blocks.0.attn.q_bias',
                  'encoder.blocks.0.attn.v_bias', 'encoder.norm.weight', 'decoder.blocks.1.mlp.fc2.bias', 'decoder.norm.weight',
                  'decoder.head.weight', 'encoder_to_decoder.weight', 'mask_token']
    assert all(k in original for k in documented) and not any('k_bias' in k or 'qkv.bias' in k for k in original)
    torch.save(dict(model={'module.' + k: v for k, v in original.items()}, epoch=799), tmp_path / 'checkpoint-799.pth')
    ours = VideoMAE(VideoMAEEncoder(**OURS), decoder_dim=32, decoder_depth=2, decoder_heads=2).eval()
    rep = load_videomae(tmp_path / 'checkpoint-799.pth', ours)
    assert (rep['layout'], rep['source'], rep['missing'], rep['unexpected']) == ('original', 'model', [], [])
    assert sorted(original) == sorted(ours.state_dict())
    bool_masked = torch.tensor([[1, 1, 0, 0, 1, 1, 0, 0]] * 2, dtype=torch.bool)
    with torch.no_grad():
        assert (ours(clip, masks_of(bool_masked)).pred - hf(hf_video(clip), bool_masked_pos=bool_masked).logits).abs().max() <= 1e-5
    # ours written back in the same layout, and the encoder alone from it
    f = save_videomae(tmp_path / 'again.pth', ours)
    enc = VideoMAEEncoder(**OURS).eval()
    assert load_videomae(f, enc)['unexpected'] == []
    with torch.no_grad(): assert torch.equal(enc(clip), ours.encoder(clip))

def test_safetensors_file(tmp_path, clip):
    hf = randomise(VideoMAEModel(VideoMAEConfig(**HF)), seed=3)
    hf.save_pretrained(tmp_path)                                       # model.safetensors + config.json
    ours = VideoMAEEncoder(**OURS).eval()
    assert load_videomae(tmp_path / 'model.safetensors', ours)['layout'] == 'huggingface'
    with torch.no_grad(): assert (ours(clip) - hf(hf_video(clip)).last_hidden_state).abs().max() <= 1e-5

def test_a_tiny_videomae_overfits_one_clip():
    seq = make_sequence(3, '4CH', n_frames=8, size=(32, 32))
    clip = normalise(seq['video'])[None]
    torch.manual_seed(0)
    model = build_videomae('vit_tiny', img_size=32, num_frames=8, patch_size=8, depth=2, decoder_dim=96, decoder_depth=2)
    opt = torch.optim.AdamW(videomae_param_groups(model, 0.05), betas=(0.9, 0.95))
    losses = [videomae_step(model, clip, opt, lr=3e-3, wd=0.05, generator=torch.Generator().manual_seed(1))['loss'] for _ in range(200)]
    assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])

def test_loss_counts_only_masked_tubelets_and_normalises_per_tubelet():
    torch.manual_seed(0)
    model = build_videomae('vit_tiny', img_size=32, num_frames=4, patch_size=8, depth=1, decoder_dim=48, decoder_depth=1).eval()
    video = torch.randn(2, 3, 4, 32, 32)
    vis, msk = tube_mask(2, model.grid, 0.75, torch.Generator().manual_seed(0))
    with torch.no_grad():
        out, target = model(video, (vis, msk)), model.targets(video)
        t2 = target.clone()
        for b in range(2): t2[b, vis[b]] = 9.
        assert masked_mse(out.pred, t2, msk) == out.loss
        t2 = target.clone(); t2[1, msk[1, -1], 0] += 1.
        assert masked_mse(out.pred, t2, msk) > out.loss
    # the target of token n by brute force: un-normalise, take its 2x8x8 tubelet, normalise each channel (unbiased std + 1e-6)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    raw = video * std.view(1, 3, 1, 1, 1) + mean.view(1, 3, 1, 1, 1)
    for b, n in ((0, 0), (1, 21)):
        t, i, j = n // 16, n // 4 % 4, n % 4
        cube = raw[b, :, 2 * t:2 * t + 2, 8 * i:8 * i + 8, 8 * j:8 * j + 8].reshape(3, -1).double()   # (c, pixels in t,i,j order)
        expect = (cube - cube.mean(1, keepdim=True)) / (cube.std(1, keepdim=True) + 1e-6)
        assert torch.allclose(target[b, n].view(128, 3).T.double(), expect, atol=1e-4)
    assert torch.allclose(normalise_tubelets(tubelet_pixels(raw, 2, 8)).flatten(2), target, atol=1e-5)

def test_bad_inputs_give_clear_errors(tmp_path):
    model = build_videomae('vit_tiny', img_size=32, num_frames=4, patch_size=16, depth=1, decoder_dim=48, decoder_depth=1)
    opt = torch.optim.AdamW(videomae_param_groups(model))
    video = torch.randn(1, 3, 4, 32, 32)
    with pytest.raises(ValueError, match=r'ratio must be in \[0, 1\)'): videomae_step(model, video, opt, lr=1e-3, wd=0., ratio=1.)
    with pytest.raises(ValueError, match='hides no tubelet'): videomae_step(model, video, opt, lr=1e-3, wd=0., ratio=0.1)
    with pytest.raises(ValueError, match=r'expected a clip \(B, 3, T, H, W\)'): videomae_step(model, video[:, :1], opt, lr=1e-3, wd=0.)
    # a checkpoint of another shape: refused naming the file and the key, nothing loaded
    f = save_videomae(tmp_path / 'small.pth', build_videomae('vit_small', img_size=32, num_frames=4, patch_size=16, depth=1,
                                                              decoder_dim=48, decoder_depth=1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r'small\.pth.*encoder\.patch_embed\.proj\.weight file \(384, 3, 2, 16, 16\) vs model \(192, 3, 2, 16, 16\)'):
        load_videomae(f, model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(FileNotFoundError, match='nothere.pth'): load_videomae(tmp_path / 'nothere.pth', model)
    with pytest.raises(FileNotFoundError, match='nothere.safetensors'): load_videomae(tmp_path / 'nothere.safetensors', model)
    (tmp_path / 'junk.safetensors').write_bytes(b'not a safetensors file')
    with pytest.raises(ValueError, match='junk.safetensors'): load_videomae(tmp_path / 'junk.safetensors', model)
