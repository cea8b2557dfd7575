"""Runs that fail loudly and early: one test per defect a hostile-but-realistic user found (issue 11).
Each of these failed on the code before the fix; the tiny run settings come from test_pipeline."""
import json, os, signal, subprocess, sys, time, warnings
from dataclasses import replace
from pathlib import Path
import pytest, torch

from usjepa.config import RunConfig, validate, prepare_run_dir
from usjepa.pipeline import run
from test_pipeline import ROOT, TINY, tiny

def _weights(path): return torch.load(path, weights_only=True)['target_encoder']

# 1. a NaN loss stops the run before anything is saved; the last good checkpoint stays
def test_divergence_stops_before_saving_and_keeps_the_good_checkpoint(tmp_path, monkeypatch):
    import usjepa.stages
    c = tiny(tmp_path, pretrain_epochs=3)
    real = usjepa.stages.pretrain_step
    def step(*a, **kw): return {**real(*a, **kw), 'loss': float('nan')}   # NaN at the first step after the resume
    with pytest.raises(KeyboardInterrupt):                                  # a good epoch 0, then stop
        run(c, on_epoch_end=lambda s, e, row: (_ for _ in ()).throw(KeyboardInterrupt))
    good = _weights(tmp_path / 'run' / 'pretrain.pt')
    monkeypatch.setattr(usjepa.stages, 'pretrain_step', step)
    with pytest.raises(FloatingPointError, match=r'pretrain diverged at epoch 1, step 0.*last good checkpoint'):
        run(c)
    ck = torch.load(tmp_path / 'run' / 'pretrain.pt', weights_only=True)
    assert ck['epoch'] == 0 and all(torch.equal(good[k], ck['target_encoder'][k]) for k in good)
    assert not (tmp_path / 'run' / 'probe.pt').exists()

def test_a_huge_learning_rate_fails_the_papermill_job(tmp_path):
    import papermill as pm
    params = {**TINY, 'out_dir': str(tmp_path / 'pm'), 'lr': 1e6, 'start_lr': 1e6, 'final_lr': 1e6}
    with pytest.raises(pm.PapermillExecutionError, match='diverged'):
        pm.execute_notebook(str(ROOT / 'nbs' / 'train.ipynb'), str(tmp_path / 'out.ipynb'), parameters=params,
                            kernel_name='python3', cwd=str(tmp_path), progress_bar=False)
    assert not (tmp_path / 'pm' / 'metrics.json').exists()

def test_numbers_must_be_finite(tmp_path):
    with pytest.raises(ValueError, match='lr=inf'): validate(tiny(tmp_path, lr=1e400))

# 2. a token grid too small for the mask generators is refused at once (it used to hang)
def test_a_one_token_frame_is_refused_quickly(tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match='too small'): validate(tiny(tmp_path, img_size=8, patch_size=8))
    code = "from usjepa.masking import vjepa_masks\ntry: vjepa_masks(2, (2, 1, 1))\nexcept ValueError as e: print('refused:', e)"
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=60).stdout
    assert 'refused' in out and time.perf_counter() - t0 < 60

# 3 and 4. an init checkpoint that does not fit, or is no checkpoint, is refused before anything is written
@pytest.fixture
def tiny_checkpoint(tmp_path):
    from usjepa.model import build_encoder, build_predictor
    from usjepa.checkpoints import save_checkpoint
    enc = build_encoder('vit_tiny', img_size=TINY['img_size'], num_frames=TINY['num_frames'], patch_size=TINY['patch_size'])
    pred = build_predictor(enc, predictor_embed_dim=TINY['predictor_dim'], depth=TINY['predictor_depth'])
    return save_checkpoint(tmp_path / 'tiny.pt', enc, enc, pred)

def test_a_checkpoint_of_another_model_is_refused(tmp_path, tiny_checkpoint):
    with pytest.raises(ValueError, match=r'tiny\.pt.*missing|tiny\.pt.*mis-shaped|tiny\.pt.*fit'):
        validate(tiny(tmp_path, init_checkpoint=str(tiny_checkpoint), model='vit_small'))
    assert not (tmp_path / 'run').exists()

def test_the_load_report_is_part_of_the_result(tmp_path, tiny_checkpoint):
    res = run(tiny(tmp_path, init_checkpoint=str(tiny_checkpoint), pretrain_epochs=0, warmup_epochs=0, probe_epochs=1))
    rep = res['init_checkpoint_report']
    assert rep['encoder']['missing'] == [] and rep['encoder']['loaded'] > 0

@pytest.mark.parametrize('content', [b'this is not a checkpoint\n', 'truncated'])
def test_a_broken_checkpoint_file_is_named_before_any_work(tmp_path, tiny_checkpoint, content):
    bad = tmp_path / 'bad.pt'
    bad.write_bytes(tiny_checkpoint.read_bytes()[:4000] if content == 'truncated' else content)
    with pytest.raises(ValueError, match='bad.pt'): validate(tiny(tmp_path, init_checkpoint=str(bad)))
    assert not (tmp_path / 'run').exists()

def test_a_failed_start_does_not_block_the_corrected_run(tmp_path):
    c = validate(tiny(tmp_path))
    prepare_run_dir(replace(c, lr=0.5))                     # a run that stopped before its first checkpoint
    prepare_run_dir(c)                                       # the corrected parameters take the folder

# 5. every split is read before the first training step
def test_no_test_patients_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"split 'val'|split 'test'"): run(tiny(tmp_path, synthetic_patients=2))
    assert not (tmp_path / 'run' / 'pretrain.pt').exists()

def test_a_corrupt_test_file_fails_before_training(tmp_path):
    from usjepa.phantom import write_camus_phantom
    from usjepa.data import camus_split
    root = write_camus_phantom(tmp_path / 'camus', n_patients=6, size=(64, 64), progress=False)
    victim = camus_split(root, 'test')[0]
    f = next((root / 'database_nifti' / victim).glob('*_2CH_half_sequence_gt.nii.gz'))
    f.write_bytes(f.read_bytes()[:200])                      # truncated: the header reads, the data does not
    with pytest.raises(ValueError, match=victim): run(tiny(tmp_path, data_dir=str(root)))
    assert not (tmp_path / 'run' / 'pretrain.pt').exists()

# 7. temporaries of a writer killed during a checkpoint write are removed when the run folder is opened
def test_temporaries_of_killed_writers_are_removed(tmp_path):
    c = validate(tiny(tmp_path))
    out = prepare_run_dir(c)
    code = (f"import time\nfrom usjepa.core import atomic_write\nwith atomic_write({str(out / 'pretrain.pt')!r}) as t:\n"
            "    t.write_bytes(b'x' * 10**6)\n    print('writing', flush=True)\n    time.sleep(60)")
    p = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == 'writing'
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert [q.name for q in out.glob('.pretrain.*.tmp.pt')]  # kill -9 runs no cleanup
    prepare_run_dir(c)
    assert not list(out.glob('.*.tmp*')) and not (out / 'pretrain.pt').exists()

# 8. the log row is written before the checkpoint, and a torn last line does not stop a resume
def test_a_kill_between_row_and_checkpoint_loses_no_row(tmp_path, monkeypatch):
    import usjepa.stages
    c = tiny(tmp_path)
    ref = run(tiny(tmp_path, 'ref'))
    real = usjepa.stages.save_checkpoint
    def dies_on_epoch_1(*a, **kw):
        if kw['epoch'] == 1: raise KeyboardInterrupt          # killed after the row, before the checkpoint
        return real(*a, **kw)
    monkeypatch.setattr(usjepa.stages, 'save_checkpoint', dies_on_epoch_1)
    with pytest.raises(KeyboardInterrupt): run(c)
    assert [json.loads(l)['epoch'] for l in (tmp_path / 'run' / 'pretrain_log.jsonl').read_text().splitlines()] == [0, 1]
    monkeypatch.setattr(usjepa.stages, 'save_checkpoint', real)
    with open(tmp_path / 'run' / 'pretrain_log.jsonl', 'a') as f: f.write('{"epoch": 2, "lo')   # and a torn line
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        res = run(c)
    assert [json.loads(l)['epoch'] for l in (tmp_path / 'run' / 'pretrain_log.jsonl').read_text().splitlines()] == [0, 1]
    assert res['summary'] == ref['summary']

# 9. parameters: duplicates, strings where numbers belong, sizes that fail late
@pytest.mark.parametrize('bad, msg', [(dict(views='2CH,2CH'), 'twice'), (dict(lr='1e-3'), "lr='1e-3' (str)"),
                                      (dict(lam='0.25'), "lam='0.25' (str)"), (dict(synthetic_size=16), 'synthetic_size=16')])
def test_bad_parameter_values_are_named(tmp_path, bad, msg):
    with pytest.raises(ValueError, match=msg.replace('(', r'\(').replace(')', r'\)')): validate(tiny(tmp_path, **bad))
