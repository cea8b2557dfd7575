"The experiment grid through papermill: a tiny grid end to end (two jobs at a time), re-running fills only gaps, a failed job is reported and blocks its probe jobs."
import json
from pathlib import Path

from usjepa.grid import (PRESETS, plan, check_plan, run_grid, collect, seed_table, compare, compare_table, ef_rows, figure2,
                         atlas_rows, mlp_rows, reference_table)

NB = Path(__file__).resolve().parents[1] / 'nbs' / 'train.ipynb'
TINY = {**PRESETS['tiny'], 'methods': ('unet', 'vjepa'), 'label_fractions': (1.0, 0.5)}


def test_a_tiny_grid_end_to_end(tmp_path):
    jobs = check_plan(plan(TINY, tmp_path))
    assert [j.name for j in jobs] == ['unet-lf1-seed0', 'unet-lf0.5-seed0', 'vjepa-fb0-lf1-seed0', 'vjepa-fb0-lf0.5-seed0']
    assert run_grid(jobs, tmp_path, notebook=NB, progress=False, workers=2) == {j.name: 'ran' for j in jobs}   # two at a time
    probe = tmp_path / 'vjepa-fb0-lf0.5-seed0'
    cfg = json.loads((probe / 'config.json').read_text())
    assert cfg['pretrained_run'] == str(tmp_path / 'vjepa-fb0-lf1-seed0') and cfg['label_fraction'] == 0.5
    assert not (probe / 'pretrain.pt').exists() and (tmp_path / 'vjepa-fb0-lf1-seed0' / 'pretrain.pt').exists()
    assert (probe / 'train.ipynb').exists()                                    # the executed report of each job
    rows = collect(jobs, tmp_path)
    assert all(r['status'] == 'done' and 0 <= r['test']['paper:mean']['dsc']['mean'] <= 1 for r in rows)
    table = seed_table(rows)
    assert '| U-Net |' in table and '| V-JEPA fb0 |' in table and '100% labels' in table and '50% labels' in table
    assert 'EF MAE' in ef_rows(rows)
    atlas = atlas_rows(rows, tmp_path)                                         # the trivial reference, per (seed, fraction)
    assert [(a['seed'], a['label_fraction']) for a in atlas] == [(0, 0.5), (0, 1.0)]
    n = {r['label_fraction']: r['test']['n_frames'] for r in rows}
    assert all(a['test']['n_frames'] == n[a['label_fraction']] for a in atlas)   # scored on the runs' own test frames
    assert '| atlas of the training labels |' in seed_table(rows + atlas) and '| U-Net | 100% |' in reference_table(rows, atlas)
    mlp = mlp_rows(rows, tmp_path)                                             # the per-pixel MLP, on the same frames
    assert [(m['seed'], m['label_fraction'], m['test']['n_frames']) for m in mlp] == [(a['seed'], a['label_fraction'], a['test']['n_frames']) for a in atlas]
    assert '| per-pixel MLP |' in seed_table(rows + mlp) and '(− per-pixel MLP)' in reference_table(rows, mlp, b='mlp')
    fig = figure2(rows, tmp_path, n_clips=2)
    assert len(fig.axes) == 2 * (1 + len(jobs))                               # reference + every run, per clip
    called = []
    assert set(run_grid(jobs, tmp_path, notebook=NB, progress=False,
                        execute=lambda *a: called.append(a)).values()) == {'done'} and not called   # nothing to fill


def test_a_failing_pretraining_is_reported_and_blocks_its_probe_jobs(tmp_path):
    preset = {**TINY, 'methods': ('vjepa',), 'base': {**TINY['base'], 'lr': 1e6, 'start_lr': 1e6, 'final_lr': 1e6}}
    jobs = check_plan(plan(preset, tmp_path))
    r = run_grid(jobs, tmp_path, notebook=NB, progress=False)
    assert r == {'vjepa-fb0-lf1-seed0': 'failed', 'vjepa-fb0-lf0.5-seed0': 'blocked'}
    assert 'diverged' in (tmp_path / 'vjepa-fb0-lf1-seed0' / 'error.txt').read_text()
    rows = collect(jobs, tmp_path)
    assert [r['status'] for r in rows] == ['failed', 'todo'] and 'diverged' in rows[0]['error']
    assert 'not done' in seed_table(rows)                                     # the table says what is missing
    assert compare(rows) == [] and compare_table([], rows).count('\n') == 1


def test_the_grid_finds_the_training_notebook_from_the_root_and_from_nbs(tmp_path, monkeypatch):
    "README runs `papermill nbs/experiments.ipynb …` from the repository root; Jupyter starts kernels in nbs/."
    import pytest
    from usjepa.grid import find_notebook
    for where in (NB.parents[1], NB.parent):
        monkeypatch.chdir(where)
        assert find_notebook() == NB
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match='neither in'): find_notebook()
    with pytest.raises(FileNotFoundError, match='neither in'): run_grid([], tmp_path)
    with pytest.raises(FileNotFoundError, match='does not exist'): run_grid([], tmp_path, notebook=tmp_path / 'train.ipynb')


def test_a_videomae_probe_job_reuses_its_pretraining_whatever_the_jepa_only_defaults(tmp_path):
    "The saved configuration is a normal form (SIGReg 0 for VideoMAE), and so is the probe job's before they are compared."
    from dataclasses import asdict
    from usjepa.config import RunConfig, validate, normal_form
    pre = tmp_path / 'videomae-lf1'
    pre.mkdir()
    (pre / 'config.json').write_text(json.dumps(asdict(normal_form(RunConfig(method='videomae', out_dir=str(pre))))))
    import torch
    torch.save({'epoch': RunConfig().pretrain_epochs - 1}, pre / 'pretrain.pt')   # a finished pretraining
    c = validate(RunConfig(method='videomae', label_fraction=0.5, pretrained_run=str(pre), out_dir=str(tmp_path / 'probe')))
    assert c.sigreg_coeff == 0. and RunConfig().sigreg_coeff == 1.0


def test_a_pretraining_saved_before_a_field_existed_is_not_reused(tmp_path):
    "A pretraining field that the saved config.json lacks is not taken as its default: the reuse is refused, naming it."
    from dataclasses import asdict
    import pytest, torch
    from usjepa.config import RunConfig, validate, normal_form
    pre = tmp_path / 'old'
    pre.mkdir()
    saved = asdict(normal_form(RunConfig(out_dir=str(pre))))
    del saved['sigreg_coeff']                                   # as a run from before SIGReg was a field
    (pre / 'config.json').write_text(json.dumps(saved))
    torch.save({'epoch': RunConfig().pretrain_epochs - 1}, pre / 'pretrain.pt')
    probe = RunConfig(label_fraction=0.5, pretrained_run=str(pre), out_dir=str(tmp_path / 'probe'))
    with pytest.raises(ValueError, match=r"sigreg_coeff=<not recorded> there, 1.0 here"): validate(probe)
    (pre / 'config.json').write_text(json.dumps({**saved, 'sigreg_coeff': 1.0}))
    assert validate(probe).pretrained_run == str(pre)


def test_a_killed_grid_takes_its_workers_with_it(tmp_path):
    "With workers=2, killing the grid's process (a kernel restart, `kill -9`) ends its worker processes too, mid-job."
    import os, signal, subprocess, sys, time
    (tmp_path / 'slow_jobs.py').write_text(
        "import os, time\nfrom pathlib import Path\n"
        "def execute(nb, output, params):\n"
        "    (Path(params['out_dir']) / 'pid').write_text(str(os.getpid()))\n"
        "    time.sleep(120)\n")
    script = (f"import sys; sys.path.insert(0, {str(tmp_path)!r})\nimport slow_jobs\nfrom usjepa import grid\n"
              f"if __name__ == '__main__':\n"
              f"    grid.run_grid(grid.plan('tiny', {str(tmp_path / 'grid')!r}), {str(tmp_path / 'grid')!r}, notebook={str(NB)!r},\n"
              f"                  execute=slow_jobs.execute, workers=2, progress=False)\n")
    (tmp_path / 'run.py').write_text(script)
    grid = subprocess.Popen([sys.executable, str(tmp_path / 'run.py')])
    def alive(pid):
        try: os.kill(pid, 0); return True
        except ProcessLookupError: return False
    pids = []
    for _ in range(120):                                       # both workers inside a job
        pids = [int(p.read_text()) for p in (tmp_path / 'grid').glob('*/pid') if p.read_text()]
        if len(pids) == 2: break
        time.sleep(0.5)
    assert len(pids) == 2 and all(map(alive, pids))
    grid.send_signal(signal.SIGKILL); grid.wait()
    deadline = time.time() + 15
    while any(map(alive, pids)) and time.time() < deadline: time.sleep(0.5)
    assert not any(map(alive, pids)), 'a worker outlived the grid'
