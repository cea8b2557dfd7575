"The main job end to end on tiny settings: papermill, resume after an interruption, DDP with 2 CPU processes."
import json, os, subprocess, sys
from dataclasses import replace
from pathlib import Path
import pytest, torch

from usjepa.config import RunConfig, validate, prepare_run_dir, PAPER_PRESET, PARAMETERS
from usjepa.pipeline import run, launch
from usjepa.stages import grad_clip_at

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(synthetic_patients=6, synthetic_size=64, img_size=32, patch_size=8, num_frames=4, frame_step=2,
            predictor_dim=48, predictor_depth=1, probe_dim=32, batch_size=2, probe_batch_size=4,
            pretrain_epochs=2, warmup_epochs=1, probe_epochs=2, n_pairs=10, progress=False)

def tiny(tmp_path, name='run', **kw): return RunConfig(**{**TINY, 'out_dir': str(tmp_path / name), **kw})

def test_notebook_parameters_are_the_run_config():
    "The papermill parameters cell of train.ipynb is a preset (the CPU default) and every RunConfig field with the same default and type."
    import ast
    from dataclasses import fields
    nb = json.loads((ROOT / 'nbs' / 'train.ipynb').read_text())
    cell = [c for c in nb['cells'] if 'parameters' in c['metadata'].get('tags', [])]
    assert len(cell) == 1
    params = {n.target.id: (ast.literal_eval(n.value), n.annotation.id) for n in ast.parse(''.join(cell[0]['source'])).body}
    cfg = {'preset': ('cpu', 'str'), **{f.name: (f.default, f.type.__name__) for f in fields(RunConfig)}}
    assert params == cfg and list(params) == list(PARAMETERS)

def test_papermill_reads_every_parameter():
    "papermill's own parser (used by `--help-notebook` and for injection) understands every parameter line."
    from dataclasses import fields
    from papermill.translators import PythonTranslator
    nb = json.loads((ROOT / 'nbs' / 'train.ipynb').read_text())
    cell = next(c for c in nb['cells'] if 'parameters' in c['metadata'].get('tags', []))
    names = [p.name for p in PythonTranslator.inspect({'source': ''.join(cell['source'])})]
    assert names == list(PARAMETERS)                       # a '=' inside a comment makes papermill skip the line

def test_notebook_states_the_paper_preset():
    "The table of the paper's setting in train.ipynb is PAPER_PRESET and the CPU default, value for value, row for row."
    import re
    nb = json.loads((ROOT / 'nbs' / 'train.ipynb').read_text())
    md = next(''.join(c['source']) for c in nb['cells'] if c['cell_type'] == 'markdown' and "paper's setting" in ''.join(c['source']))
    rows = {k: (paper, cpu) for k, paper, cpu in re.findall(r'^\| `(\w+)` \| (\S+) \| (\S+) \|$', md, re.M)}
    assert list(rows) == list(PAPER_PRESET)
    for k, v in PAPER_PRESET.items():
        d = getattr(RunConfig(), k)
        assert (type(v)(rows[k][0]), type(d)(rows[k][1])) == (v, d), (k, rows[k], v, d)

def test_bad_parameters_are_named_before_any_work(tmp_path):
    cases = dict(lam=1.5, label_fraction=0.0, frozen_blocks=13, method='simclr', data_dir=str(tmp_path / 'nope'),
                 img_size=30, views='3CH')
    for k, v in cases.items():
        with pytest.raises(ValueError, match=f"{k}="): validate(tiny(tmp_path, **{k: v}))
    with pytest.raises(ValueError, match='resume'): validate(tiny(tmp_path, resume='no'))   # a string would be truthy
    with pytest.raises(ValueError, match='mae_ratio=1.0'): validate(tiny(tmp_path, method='videomae', mae_ratio=1.0))
    with pytest.raises(ValueError, match='unet_frames=2'): validate(tiny(tmp_path, method='unet', unet_frames=2))
    with pytest.raises(ValueError, match='trains from scratch'): validate(tiny(tmp_path, method='unet', init_checkpoint='x.pt'))
    assert not (tmp_path / 'run').exists()          # nothing was written

def test_grad_clipping_starts_after_warmup_as_vjepa():
    "V-JEPA clips when `epoch > warmup` (0-based epochs); clip_grad=0 never clips."
    assert [grad_clip_at(RunConfig(warmup_epochs=3, clip_grad=5.), e) for e in range(6)] == [None] * 4 + [5., 5.]
    assert grad_clip_at(RunConfig(warmup_epochs=0), 0) is None and grad_clip_at(RunConfig(warmup_epochs=0), 1) == 10.
    assert grad_clip_at(RunConfig(warmup_epochs=0, clip_grad=0.), 5) is None

def test_pretraining_passes_the_clip_per_epoch(tmp_path, monkeypatch):
    import usjepa.stages
    seen, real = [], usjepa.stages.pretrain_step
    monkeypatch.setattr(usjepa.stages, 'pretrain_step', lambda *a, **kw: seen.append(kw['clip_grad']) or real(*a, **kw))
    c = validate(tiny(tmp_path, warmup_epochs=0, clip_grad=3.))
    prepare_run_dir(c)
    usjepa.stages.pretrain(c, usjepa.stages.prepare_data(c))
    half = len(seen) // 2
    assert half > 0 and seen == [None] * half + [3.] * half    # epoch 0 unclipped (0 > 0 is false), epoch 1 clipped

def test_run_folder_is_never_mixed_or_overwritten(tmp_path):
    c = validate(tiny(tmp_path))
    prepare_run_dir(c)
    prepare_run_dir(replace(c, lam=0.5))            # nothing trained yet: a corrected start may take the folder (issue 11)
    prepare_run_dir(c)
    (tmp_path / 'run' / 'pretrain.pt').write_bytes(b'x')
    with pytest.raises(ValueError, match='lam'): prepare_run_dir(replace(c, lam=0.5))
    with pytest.raises(ValueError, match='resume=False'): prepare_run_dir(replace(c, resume=False))
    prepare_run_dir(replace(c, num_workers=1))      # run-only settings may change

def _metrics(out): return json.loads((Path(out) / 'metrics.json').read_text())

def test_papermill_runs_the_training_notebook(tmp_path):
    import papermill as pm
    params = {**TINY, 'out_dir': str(tmp_path / 'pm'), 'lam': 0.25}
    pm.execute_notebook(str(ROOT / 'nbs' / 'train.ipynb'), str(tmp_path / 'out.ipynb'), parameters=params,
                        kernel_name='python3', cwd=str(tmp_path), progress_bar=False)
    out = tmp_path / 'pm'
    for f in ('config.json', 'pretrain.pt', 'probe.pt', 'metrics.json', 'losses.png', 'qualitative.png',
              'pretrain_log.jsonl', 'probe_log.jsonl'):
        assert (out / f).is_file(), f
    assert json.loads((out / 'config.json').read_text())['lam'] == 0.25
    m = _metrics(out)
    assert m['summary']['n_frames'] > 0
    for cls in ('paper:LV endo', 'paper:myocardium', 'paper:LA', 'paper:mean', 'camus:LV_epi', 'camus:mean'):
        for k in ('dsc', 'ji', 'ppv', 'recall'): assert 0 <= m['summary'][cls][k]['mean'] <= 1
    assert len(m['per_frame']['ids']) == m['summary']['n_frames']
    logs = [json.loads(l) for l in (out / 'pretrain_log.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in logs] == [0, 1] and all(r['loss_aux'] == r['loss_aux'] for r in logs)  # aux is on
    assert all(r[k] > 0 for r in logs for k in ('grad_norm_enc', 'grad_norm_pred', 'grad_norm_aux'))
    nb = json.loads((tmp_path / 'out.ipynb').read_text())
    printed = [''.join(o.get('text', '')) for c in nb['cells'] for o in c.get('outputs', [])]
    assert any('mean DSC' in t for t in printed)
    assert m['cavity'] and {'area_pred', 'area_ref', 'pieces', 'outside_largest'} <= set(m['cavity'][0])   # why an EF is off
    assert any('ES/ED cavity area over' in t for t in printed)

class Interrupt(KeyboardInterrupt): pass

def test_resume_after_interruption_gives_the_same_result(tmp_path):
    ref = run(tiny(tmp_path, 'ref'))
    def stop_at(stage, epoch):
        def hook(s, e, row):
            if (s, e) == (stage, epoch): raise Interrupt
        return hook
    c = tiny(tmp_path, 'resumed')
    with pytest.raises(Interrupt): run(c, on_epoch_end=stop_at('pretrain', 0))
    assert torch.load(tmp_path / 'resumed' / 'pretrain.pt', weights_only=True)['epoch'] == 0
    with pytest.raises(Interrupt): run(c, on_epoch_end=stop_at('probe', 0))
    assert torch.load(tmp_path / 'resumed' / 'probe.pt', weights_only=True)['epoch'] == 0
    res = run(c)
    a, b = _metrics(tmp_path / 'ref'), _metrics(tmp_path / 'resumed')
    assert a['per_frame']['counts'] == b['per_frame']['counts']
    pa = torch.load(tmp_path / 'ref' / 'probe.pt', weights_only=True)['head']
    pb = torch.load(tmp_path / 'resumed' / 'probe.pt', weights_only=True)['head']
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    logs = [json.loads(l)['epoch'] for l in (tmp_path / 'resumed' / 'pretrain_log.jsonl').read_text().splitlines()]
    assert logs == [0, 1]                            # each epoch logged once

def test_activation_checkpointing_changes_memory_not_results(tmp_path, monkeypatch):
    "Recomputing activations gives the same weights; it may be switched on or off when a run resumes (e.g. after an OOM)."
    import usjepa.model
    ref = run(tiny(tmp_path, 'ref'))
    calls, real = [], usjepa.model.checkpoint
    monkeypatch.setattr(usjepa.model, 'checkpoint', lambda *a, **kw: calls.append(1) or real(*a, **kw))
    c = tiny(tmp_path, 'ckpt', activation_checkpointing=True)
    def stop(s, e, row):
        if (s, e) == ('pretrain', 0): raise Interrupt
    with pytest.raises(Interrupt): run(c, on_epoch_end=stop)
    assert calls                                              # the run really checkpointed ...
    n = len(calls)
    run(replace(c, activation_checkpointing=False))          # ... and resumes the same run folder without it
    assert len(calls) == n
    for f, key in (('pretrain.pt', 'target_encoder'), ('probe.pt', 'head')):
        a = torch.load(tmp_path / 'ref' / f, weights_only=True)[key]
        b = torch.load(tmp_path / 'ckpt' / f, weights_only=True)[key]
        assert all(torch.equal(a[k], b[k]) for k in a), f
    assert _metrics(tmp_path / 'ref')['per_frame']['counts'] == _metrics(tmp_path / 'ckpt')['per_frame']['counts']

def test_bf16_precision_runs_end_to_end_on_cpu(tmp_path):
    "precision='bf16' takes the autocast path a GPU run takes; on the CPU too it must train and score every frame."
    ref, bf16 = run(tiny(tmp_path, 'fp32')), run(tiny(tmp_path, 'bf16', precision='bf16'))
    logs = [json.loads(l) for l in (tmp_path / 'bf16' / 'pretrain_log.jsonl').read_text().splitlines()]
    assert all(r['loss'] == r['loss'] and r['loss'] < 10 for r in logs)
    assert bf16['summary']['n_frames'] == ref['summary']['n_frames']
    fp32 = [json.loads(l) for l in (tmp_path / 'fp32' / 'pretrain_log.jsonl').read_text().splitlines()]
    assert all(abs(a['loss'] - b['loss']) > 1e-7 for a, b in zip(logs, fp32))     # really computed in bf16

def test_ddp_two_cpu_processes_end_with_identical_weights(tmp_path):
    res = launch(tiny(tmp_path, 'ddp', nproc_per_node=2, master_port=29731))
    fp = res['rank_fingerprints']
    assert len(fp) == 2 and fp[0] == fp[1], fp
    assert _metrics(tmp_path / 'ddp')['summary']['n_frames'] > 0


def test_one_pretraining_probed_with_learned_and_token_queries(tmp_path):
    "probe_queries changes the probe only: both kinds reuse one finished pretraining, and only 'tokens' trains a token_query."
    from usjepa.checkpoints import open_checkpoint
    pre = run(tiny(tmp_path, 'pre', probe_epochs=1))                    # the CPU default: token queries
    learned = run(tiny(tmp_path, 'learned', probe_epochs=1, probe_queries='learned', pretrained_run=pre['out_dir']))
    token_query = lambda r: [k for k in open_checkpoint(Path(r['out_dir']) / 'probe.pt')['head'] if 'token_query' in k]
    assert token_query(pre) and not token_query(learned)
    assert not (Path(learned['out_dir']) / 'pretrain.pt').exists()      # the pretraining was reused, not redone
    assert _metrics(learned['out_dir'])['summary']['n_frames'] == _metrics(pre['out_dir'])['summary']['n_frames']
