"The pretraining diagnostics in a run: logged every epoch, plotted in the report, and a loud warning on collapse."
import json, warnings
from pathlib import Path
import pytest

from usjepa.config import RunConfig, validate, prepare_run_dir
from usjepa.pipeline import run
from usjepa.stages import prepare_data, pretrain
from usjepa.diagnostics import DIAGNOSTIC_KEYS, read_diagnostics

TINY = dict(synthetic_patients=6, synthetic_size=64, img_size=32, patch_size=8, num_frames=4, frame_step=2,
            predictor_dim=48, predictor_depth=1, probe_dim=32, batch_size=2, probe_batch_size=4,
            pretrain_epochs=2, warmup_epochs=1, probe_epochs=1, n_pairs=10, diag_clips=2, progress=False)

def test_a_run_logs_and_plots_its_diagnostics(tmp_path):
    c = validate(RunConfig(**TINY, out_dir=str(tmp_path / 'run')))
    run(c)
    rows = read_diagnostics(c.out_dir)
    assert [r['epoch'] for r in rows] == [-1, 0, 1]                  # the initial state, then every epoch
    assert all(k in r for r in rows for k in DIAGNOSTIC_KEYS)
    assert rows[0]['drift_target'] == 0. and rows[-1]['drift_online'] > 0.
    assert (Path(c.out_dir) / 'diagnostics.png').stat().st_size > 0

def test_collapse_is_reported_loudly(tmp_path, capsys):
    "Initial measures that every epoch falls far below (here: written as if the run had started much richer) -> a warning."
    c = validate(RunConfig(**TINY, out_dir=str(tmp_path / 'run')))
    prepare_run_dir(c)
    root = prepare_data(c)
    (Path(c.out_dir) / 'diagnostics_init.json').write_text(json.dumps(dict(rankme_target=1e6, spread_online=1e6)))
    with pytest.warns(UserWarning, match='COLLAPSE at epoch 0: rankme_target'):
        pretrain(c, root)
    assert 'COLLAPSE' in capsys.readouterr().out

def test_diagnostics_can_be_turned_off(tmp_path):
    c = validate(RunConfig(**{**TINY, 'pretrain_epochs': 1, 'warmup_epochs': 0}, diagnostics=False, out_dir=str(tmp_path / 'run')))
    prepare_run_dir(c)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        pretrain(c, prepare_data(c))
    assert not [w for w in caught if 'COLLAPSE' in str(w.message)]    # no collapse check without measures
    assert read_diagnostics(c.out_dir) == [] and not (Path(c.out_dir) / 'diagnostics_init.json').exists()
