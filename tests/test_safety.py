"""Runs that cannot silently mix, leak or read damaged data (issue 23): one test per defect found by a hostile user.
Each of these failed on the code before the fix; the tiny run settings come from test_pipeline."""
import gzip, json, os, shutil, signal, subprocess, sys, time
from dataclasses import replace
from pathlib import Path
import numpy as np
import pytest, torch

from usjepa.config import RunConfig, validate
from usjepa.pipeline import run
from test_pipeline import ROOT, TINY, tiny

@pytest.fixture(scope='module')
def camus(tmp_path_factory):
    "A tiny synthetic CAMUS folder; each test works on its own copy."
    from usjepa.phantom import write_camus_phantom
    return write_camus_phantom(tmp_path_factory.mktemp('camus') / 'CAMUS_public', n_patients=6, size=(64, 64), progress=False)

def _copy(camus, tmp_path): return Path(shutil.copytree(camus, tmp_path / 'CAMUS_public'))

def _lists(root): return {k: (root / 'database_split' / f'subgroup_{f}.txt') for k, f in
                          (('train', 'training'), ('val', 'validation'), ('test', 'testing'))}

def _nothing_trained(tmp_path): return not (tmp_path / 'run' / 'pretrain.pt').exists() and not (tmp_path / 'run' / 'probe.pt').exists()

# 1. two runs in one folder: the second fails at once, naming the folder and the holder; the first is untouched
def test_a_second_run_in_the_same_folder_fails_at_once(tmp_path):
    a = tiny(tmp_path, lam=0.25, pretrain_epochs=50, warmup_epochs=1)     # long enough to be running when B starts
    code = f"from usjepa.pipeline import run\nfrom usjepa.config import RunConfig\nrun(RunConfig(**{ {**TINY, **{k: getattr(a, k) for k in ('lam', 'pretrain_epochs', 'out_dir')}}!r}))"
    p = subprocess.Popen([sys.executable, '-c', code], env={**os.environ, 'OMP_NUM_THREADS': '1'})
    try:
        cfg = tmp_path / 'run' / 'config.json'
        for _ in range(600):
            if cfg.exists(): break
            time.sleep(0.1)
        assert cfg.exists()
        t0 = time.perf_counter()
        with pytest.raises(RuntimeError, match=rf"{tmp_path / 'run'} is in use by another run \(held by process {p.pid}"):
            run(tiny(tmp_path, lam=0.75, probe_epochs=1))
        assert time.perf_counter() - t0 < 10
        assert json.loads(cfg.read_text())['lam'] == 0.25                   # A's configuration, not B's
    finally:
        p.kill(); p.wait()

# 2. a damaged .nii.gz (nibabel never reads to the end of the gzip stream, so never checks its CRC) is named before training
def test_a_flipped_bit_in_a_nifti_is_found_before_training(tmp_path, camus):
    import nibabel as nib
    root = _copy(camus, tmp_path)
    f = root / 'database_nifti' / 'patient0001' / 'patient0001_2CH_half_sequence.nii.gz'
    good, data = f.read_bytes(), np.asarray(nib.load(str(f)).dataobj).copy()
    for pos in range(len(good) // 2, len(good) - 8):                      # a bit in the middle that nibabel decodes silently
        b = bytearray(good); b[pos] ^= 0x10; f.write_bytes(bytes(b))
        try: changed = not np.array_equal(np.asarray(nib.load(str(f)).dataobj), data)
        except Exception: continue
        if changed: break
    else: pytest.fail('no silent bit flip found')
    with pytest.raises(ValueError, match=rf'{f}: damaged gzip data'): run(tiny(tmp_path, data_dir=str(root)))
    assert _nothing_trained(tmp_path)

# 3. split lists that overlap, repeat a patient or name a missing one are refused before any work
@pytest.mark.parametrize('how', ['test patient in training', 'all in all', 'duplicate line', 'no such patient'])
def test_leaking_split_lists_are_refused_before_any_work(tmp_path, camus, how):
    root = _copy(camus, tmp_path)
    f = _lists(root)
    names = {k: p.read_text().split() for k, p in f.items()}
    if how == 'test patient in training': f['train'].write_text('\n'.join(names['train'] + names['test'][:1]) + '\n'); msg = 'share 1 patients'
    elif how == 'all in all':
        every = sorted(sum(names.values(), []))
        for p in f.values(): p.write_text('\n'.join(every) + '\n')
        msg = 'subgroup_training.txt and subgroup_validation.txt share 6 patients'
    elif how == 'duplicate line': f['test'].write_text('\n'.join(names['test'] * 2) + '\n'); msg = 'subgroup_testing.txt lists 1 patients twice'
    else: f['val'].write_text('\n'.join(names['val'] + ['patient0999']) + '\n'); msg = 'have no folder'
    with pytest.raises(ValueError, match=msg): run(tiny(tmp_path, data_dir=str(root)))
    assert not (tmp_path / 'run').exists()                                # refused by validate: nothing written

# 4. a misspelled papermill parameter stops the notebook at its configuration cell, naming the closest parameter
def test_a_misspelled_papermill_parameter_fails_at_the_config_cell(tmp_path):
    import papermill as pm
    with pytest.raises(pm.PapermillExecutionError, match='lamda: did you mean lam'):
        pm.execute_notebook(str(ROOT / 'nbs' / 'train.ipynb'), str(tmp_path / 'o.ipynb'), kernel_name='python3',
                            parameters={'lamda': 0.5, 'out_dir': str(tmp_path / 'run')}, cwd=str(tmp_path), progress_bar=False)
    assert not (tmp_path / 'run').exists()                                # before any work
    with pytest.raises(pm.PapermillExecutionError, match='presett: did you mean preset'):
        pm.execute_notebook(str(ROOT / 'nbs' / 'experiments.ipynb'), str(tmp_path / 'e.ipynb'), kernel_name='python3',
                            parameters={'presett': 'tiny', 'out_root': str(tmp_path / 'grid')}, cwd=str(tmp_path), progress_bar=False)
    assert not (tmp_path / 'grid').exists()

# 5. a grid whose preset changed does not present the old runs as the new preset's
def test_a_changed_grid_does_not_reuse_stale_runs(tmp_path):
    from usjepa.grid import PRESETS, plan, run_grid, collect
    preset = {**PRESETS['tiny'], 'methods': ('unet',), 'label_fractions': (1.0,)}
    calls = []
    def execute(nb, output, params):                                      # the training notebook, in this process
        calls.append(params['out_dir']); run(RunConfig(**params))
    jobs = plan(preset, tmp_path)
    assert run_grid(jobs, tmp_path, execute=execute, progress=False) == {'unet-lf1-seed0': 'ran'}
    before = (tmp_path / 'unet-lf1-seed0' / 'metrics.json').read_bytes()
    changed = {**preset, 'base': {**preset['base'], 'probe_epochs': 2, 'probe_lr': 5e-4}}
    with pytest.raises(ValueError, match=r"unet-lf1-seed0 \(.*probe_epochs: 1 there, 2 planned.*probe_lr: 0.001 there, 0.0005 planned"):
        run_grid(plan(changed, tmp_path), tmp_path, execute=execute, progress=False)
    assert len(calls) == 1 and (tmp_path / 'unet-lf1-seed0' / 'metrics.json').read_bytes() == before
    assert [r['status'] for r in collect(plan(changed, tmp_path), tmp_path)] == ['stale']
    assert [r['status'] for r in collect(jobs, tmp_path)] == ['done']

# 6. a folder of someone else's files is refused, and nothing in it is overwritten
def test_a_foreign_folder_is_not_overwritten(tmp_path):
    mine = tmp_path / 'run'; mine.mkdir()
    own = {'metrics.json': b'{"mine": 1}', 'summary.json': b'{"mine": 2}', 'losses.png': b'my figure'}
    for k, v in own.items(): (mine / k).write_bytes(v)
    with pytest.raises(ValueError, match=r"holds files that are not of a run of this project \(losses.png, metrics.json, summary.json\)"):
        run(tiny(tmp_path))
    assert {p.name: p.read_bytes() for p in mine.iterdir()} == own     # not even a lock file

# 7 (and the late crashes). bad geometry, phases and numbers are errors of the data check, naming the file, before training
def _raw_spacing(path, sy, sx):
    raw = bytearray(gzip.decompress(path.read_bytes())); raw[80:88] = np.array([sx, sy], '<f4').tobytes()
    path.write_bytes(gzip.compress(bytes(raw)))

def _cfg(path, key, value):
    lines = [l for l in path.read_text().splitlines() if not l.startswith(f'{key}:')]
    path.write_text('\n'.join(lines + ([] if value is None else [f'{key}: {value}'])) + '\n')

@pytest.mark.parametrize('case, msg', [
    ('spacing 0', 'pixel spacing .* must be a positive number'), ('spacing -0.3', 'pixel spacing .* must be a positive number'),
    ('spacing nan', 'pixel spacing .* must be a positive number'), ('spacing 1e6', 'mm across'),
    ('label spacing', 'must share their geometry'), ('no ES', 'no ES line'), ('ES beyond NbFrame', 'outside the'),
    ('ED 0', 'ED: 0 is outside'), ('ED = ES', 'ED and ES are the same frame'), ('ES seventeen', "ES: 'seventeen' is not a frame number"),
    ('EF n/a', "EF: 'n/a' is not a percentage")])
def test_bad_geometry_and_phases_are_named_before_training(tmp_path, camus, case, msg):
    from usjepa.data import camus_split
    root = _copy(camus, tmp_path)
    pid = camus_split(root, 'test')[0]                                    # a test patient: used only after training before
    d = root / 'database_nifti' / pid
    video, labels, cfg = (d / f'{pid}_4CH_half_sequence.nii.gz', d / f'{pid}_4CH_half_sequence_gt.nii.gz', d / 'Info_4CH.cfg')
    info = dict(l.split(': ', 1) for l in cfg.read_text().splitlines())
    bad = video
    if case.startswith('spacing'): _raw_spacing(video, float(case.split()[1]), 0.3)
    elif case == 'label spacing': _raw_spacing(labels, 0.31, 0.3); bad = labels
    else:
        bad = cfg
        key, value = dict([('no ES', ('ES', None)), ('ES beyond NbFrame', ('ES', int(info['NbFrame']) + 1)), ('ED 0', ('ED', 0)),
                           ('ED = ES', ('ED', info['ES'])), ('ES seventeen', ('ES', 'seventeen')), ('EF n/a', ('EF', 'n/a'))])[case]
        _cfg(cfg, key, value)
    with pytest.raises(ValueError, match=rf"{bad}.*{msg}|{bad}: {msg}"): run(tiny(tmp_path, data_dir=str(root)))
    assert _nothing_trained(tmp_path)

# crashes that came late or said too little: damaged checkpoints on resume, unwritable or '~' out_dir, a negative seed
@pytest.fixture(scope='module')
def finished(tmp_path_factory):
    c = tiny(tmp_path_factory.mktemp('finished'), pretrain_epochs=1, warmup_epochs=0, probe_epochs=1)
    run(c)
    return Path(c.out_dir)

@pytest.mark.parametrize('name, stage', [('pretrain.pt', 'pretraining'), ('probe.pt', 'probe')])
def test_a_damaged_checkpoint_is_named_with_what_to_do(tmp_path, finished, name, stage):
    out = Path(shutil.copytree(finished, tmp_path / 'run'))
    c = replace(validate(RunConfig(**json.loads((out / 'config.json').read_text()))), out_dir=str(out))
    f = out / name
    f.write_bytes(f.read_bytes()[:1000])                                  # truncated
    with pytest.raises(ValueError, match=rf"{f} is damaged, so the {stage} stage cannot resume.*Delete it to run that stage again"):
        run(c)
    class Payload:
        def __reduce__(self): return (os.system, (f'touch {tmp_path}/hacked',))
    torch.save({'head': Payload(), 'epoch': 0}, f)                         # garbage that torch would load unsafely
    with pytest.raises(ValueError, match=rf'{f} is damaged') as e: run(c)
    assert 'weights_only' not in str(e.value) and not (tmp_path / 'hacked').exists()

def test_out_dir_and_seed_mistakes_are_named_before_any_work(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="out_dir='/proc/usjepa-x': cannot create"): run(tiny(tmp_path, out_dir='/proc/usjepa-x'))
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))
    assert validate(tiny(tmp_path, out_dir='~/x')).out_dir == str(tmp_path / 'home' / 'x')
    with pytest.raises(ValueError, match='seed=-1 must be >= 0'): validate(tiny(tmp_path, seed=-1))

# metrics: undefined distances and dropped EF patients are counted next to the figures
def test_dropped_patients_and_undefined_frames_are_counted():
    from usjepa.scores import SegMetrics, results_table
    from usjepa.grid import ef_rows
    yy, xx = np.mgrid[:60, :40]
    cav = lambda r: (((yy - 30) / r) ** 2 + ((xx - 20) / (r / 2)) ** 2 <= 1).astype(np.int64)
    tg = np.stack([np.stack([cav(20), cav(15)])] * 2); tg[:, :, :5, :5] = 3    # a small LA in every frame
    pr = tg.copy(); pr[0, 1] = np.where(pr[0, 1] == 1, 0, pr[0, 1])           # the 2CH ES prediction misses the LV
    pr[1, 1][pr[1, 1] == 3] = 0                                               # and the 4CH ES one misses the LA
    m = SegMetrics(ed_es={('p1', v): dict(ED=0, ES=1) for v in ('2CH', '4CH')}, reference_ef={'p1': 50.})
    m.update(pr, tg, ids=dict(patient=['p1', 'p1'], view=['2CH', '4CH'], frame_idx=torch.arange(2).repeat(2, 1)), spacing=(0.3, 0.3))
    s = m.summary()
    assert s['EF']['ef']['n'] == 0 and s['EF']['ef']['n_dropped'] == 1 and s['EF']['ef_vs_cfg']['n_dropped'] == 1
    assert s['paper:LA']['hd']['n_undefined'] == 1
    assert '(1 undef.)' in results_table({'x': m}, metrics=('hd',), structures=['paper:LA'])
    row = dict(name='x', method='unet', lam=1.0, frozen_blocks=0, label_fraction=1.0, seed=0, status='done', test=s)
    assert '| 0 / 1 |' in ef_rows([row])
