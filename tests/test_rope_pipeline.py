"The pipeline with V-JEPA 2's RoPE model: pretraining with L_ll, a V-JEPA 2-layout checkpoint, the deeper multi-layer probe."
import json
from pathlib import Path

import pytest, torch

from usjepa.config import RunConfig, validate
from usjepa.pipeline import run
from usjepa.stages import load_run
from usjepa.probe import LayerFeatures

TINY = dict(synthetic_patients=6, synthetic_size=64, img_size=32, patch_size=8, num_frames=4, frame_step=2,
            predictor_dim=48, predictor_depth=1, probe_dim=32, batch_size=2, probe_batch_size=4,
            pretrain_epochs=1, warmup_epochs=0, probe_epochs=1, n_pairs=10, progress=False)


def tiny(tmp_path, name, **kw): return RunConfig(**{**TINY, 'out_dir': str(tmp_path / name), **kw})


def test_rope_run_end_to_end_and_its_checkpoint_starts_the_next(tmp_path):
    c = tiny(tmp_path, 'rope', pos_embed='rope', probe_depth=2, probe_blocks_on='tokens', out_layers='10,11')
    res = run(c)
    out = Path(res['out_dir'])
    logs = [json.loads(l) for l in (out / 'pretrain_log.jsonl').read_text().splitlines()]
    assert logs and all(r['loss_aux'] == r['loss_aux'] and r['loss_aux'] > 0 for r in logs)   # L_ll is on
    assert 0 <= res['summary']['paper:mean']['dsc']['mean'] <= 1
    # pretrain.pt is in V-JEPA 2's layout: DDP prefixes, no position tables
    ck = torch.load(out / 'pretrain.pt', weights_only=True)
    for part in ('encoder', 'target_encoder', 'predictor'):
        assert all(k.startswith('module.backbone.') for k in ck[part])
        assert not any(k.endswith(('.pos_embed', '.predictor_pos_embed')) for k in ck[part])
    # a finished RoPE run loads with its multi-layer features and its deeper probe
    cfg, enc, head = load_run(out)
    assert isinstance(enc, LayerFeatures) and enc.out_layers == (10, 11) and len(head.probe.blocks) == 1
    assert head.probe.blocks_on == 'tokens' and head.probe.blocks[0].norm1.normalized_shape == (192,)   # V-JEPA 2's place
    with torch.no_grad(): assert head(enc(torch.randn(1, 3, 4, 32, 32))).shape == (1, 4, 4, 32, 32)
    # its checkpoint starts another RoPE run with every tensor fitted; a sin-cos run refuses it before any work
    c2 = tiny(tmp_path, 'rope2', pos_embed='rope', method='vjepa', init_checkpoint=str(out / 'pretrain.pt'), probe_epochs=1)
    rep = run(c2)['init_checkpoint_report']
    for part in ('encoder', 'predictor'):
        assert rep[part]['missing'] == rep[part]['mismatched'] == [] and rep[part]['positions'] is None
    with pytest.raises(ValueError, match='positions differ'):
        validate(tiny(tmp_path, 'sincos', init_checkpoint=str(out / 'pretrain.pt')))
    assert not (tmp_path / 'sincos').exists()
