"Tests for usjepa.phantom: labels, anatomy, cycle, determinism, CAMUS folder layout, idempotence."
import json
import numpy as np
import pytest
from scipy import ndimage

from usjepa.phantom import make_sequence, write_camus_phantom, PhantomParams


def rows_of(mask): return np.nonzero(mask.any(1))[0]


@pytest.mark.parametrize('seed,view', [(0, '2CH'), (1, '4CH'), (2, '2CH'), (5, '4CH')])
def test_sequence_anatomy(seed, view):
    s = make_sequence(seed, view, size=(128, 128))
    v, lab, info = s['video'], s['labels'], s['info']
    assert v.dtype == np.uint8 and lab.dtype == np.uint8 and v.shape == lab.shape and v.shape[1:] == (128, 128)
    assert 10 <= len(v) <= 30 and info['NbFrame'] == len(v)
    assert set(np.unique(lab)) == {0, 1, 2, 3}
    assert {info['ED'], info['ES']} == {1, len(v)}                     # one of them is the last frame
    for f in range(len(v)):
        for k in (1, 2, 3):                                            # each structure is one connected piece
            cc, n = ndimage.label(lab[f] == k, np.ones((3, 3)))
            sizes = np.bincount(cc.ravel())[1:]
            assert sizes.max() >= 0.98 * sizes.sum(), (f, k, sizes)      # (a stray pixel at a thin apex is allowed)
    fan = info['fan']                                                  # labels lie inside the fan (independent mask)
    Y, X = np.mgrid[0:128, 0:128]
    r = np.hypot(X - fan['origin'][1], Y - fan['origin'][0]); th = np.arctan2(X - fan['origin'][1], Y - fan['origin'][0])
    inside = (np.abs(th) < fan['half_angle']) & (r < fan['depth'])
    assert not (lab[:, ~inside] > 0).any()
    assert (v[:, ~inside] == 0).all() and (v[:, inside] > 0).mean() > 0.5
    ed = lab[info['ED'] - 1]
    r1, r2, r3 = rows_of(ed == 1), rows_of(ed == 2), rows_of(ed == 3)
    assert r2.min() <= r1.min() < r3.min() and r1.mean() < r3.mean()   # apex at the top, wall around it, LA below
    assert 0.3 <= (r1.max() - r1.min() + 1) / 128 <= 0.7               # LV cavity ~35-65 % of the height (depth varies)
    # the myocardium surrounds the cavity except at the base: dilating the cavity hits mostly wall or atrium
    ring = ndimage.binary_dilation(ed == 1, iterations=2) & (ed != 1)
    assert np.isin(ed[ring], (2, 3)).mean() > 0.9
    # the cavity touches the atrium (open mitral plane)
    assert (ed[ndimage.binary_dilation(ed == 1, iterations=1)] == 3).any()


def test_cardiac_cycle():
    for seed in range(4):
        s = make_sequence(seed, '2CH', size=(96, 96))
        ed, es = s['info']['ED'] - 1, s['info']['ES'] - 1
        a = lambda k, f: int((s['labels'][f] == k).sum())
        assert a(1, es) < 0.85 * a(1, ed)                              # the cavity empties
        assert a(3, es) > a(3, ed)                                     # the atrium fills
        area = [a(1, f) for f in range(len(s['labels']))]
        assert area[ed] >= 0.98 * max(area) and area[es] <= 1.02 * min(area)   # ED the largest, ES the smallest (the
                                                                       # phase wobbles in between: not always monotone)


def test_some_sequences_reversed():
    infos = [make_sequence(s, '4CH', n_frames=3, size=(48, 48))['info'] for s in range(24)]
    rev = [i['ED'] == 3 for i in infos]
    assert 0 < sum(rev) < len(rev)


def test_not_a_threshold():
    "Cavity and atrium are dark, wall brighter, but a global grey threshold cannot separate the classes."
    s = make_sequence(3, '4CH', n_frames=6, size=(128, 128))
    v, lab = s['video'].astype(float), s['labels']
    inside = v > 0
    m = {k: v[(lab == k) & inside].mean() for k in range(4)}
    assert m[1] < m[2] and m[3] < m[2]
    dark = (v < (m[1] + m[2]) / 2) & inside
    # the best possible threshold rule for "cavity" (dark pixels) would also take many non-LV pixels
    assert ((lab != 1) & (lab != 3) & dark).sum() > 0.5 * ((lab == 1) & dark).sum()


def test_deterministic_and_view_shares_heart():
    a, b = make_sequence(9, '2CH', size=(64, 64)), make_sequence(9, '2CH', size=(64, 64))
    np.testing.assert_array_equal(a['video'], b['video']); np.testing.assert_array_equal(a['labels'], b['labels'])
    c = make_sequence(9, '4CH', size=(64, 64))
    assert c['info']['EF'] == a['info']['EF'] and c['info']['Age'] == a['info']['Age']
    assert not np.array_equal(make_sequence(10, '2CH', size=(64, 64))['video'][:2], a['video'][:2])


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match='3CH'): make_sequence(0, '3CH')
    with pytest.raises(ValueError, match='n_frames'): make_sequence(0, '2CH', n_frames=1)
    with pytest.raises(ValueError, match='PLAX'): write_camus_phantom(tmp_path / 'x', views=('PLAX',))


def test_camus_layout_and_idempotence(tmp_path):
    root = write_camus_phantom(tmp_path / 'camus', n_patients=3, size=(40, 48), views=('2CH',), progress=False)
    pdir = root / 'database_nifti' / 'patient0002'
    names = sorted(p.name for p in pdir.iterdir())
    assert names == sorted(['Info_2CH.cfg'] + [f'patient0002_2CH_{s}.nii.gz' for s in
                            ('half_sequence', 'half_sequence_gt', 'ED', 'ED_gt', 'ES', 'ES_gt')])
    cfg = dict(l.split(': ', 1) for l in (pdir / 'Info_2CH.cfg').read_text().splitlines())
    assert set(cfg) == {'ED', 'ES', 'NbFrame', 'Sex', 'Age', 'ImageQuality', 'EF', 'FrameRate'}
    splits = {p.name: p.read_text().split() for p in (root / 'database_split').iterdir()}
    assert sorted(sum(splits.values(), [])) == ['patient0001', 'patient0002', 'patient0003']
    assert json.loads((root / 'phantom.json').read_text())['complete'] is True
    stamp = (pdir / 'patient0002_2CH_ED.nii.gz').stat().st_mtime_ns
    assert write_camus_phantom(root, n_patients=3, size=(40, 48), views=('2CH',), progress=False) == root
    assert (pdir / 'patient0002_2CH_ED.nii.gz').stat().st_mtime_ns == stamp          # reused, not rewritten
    with pytest.raises(FileExistsError, match='camus'):
        write_camus_phantom(root, n_patients=3, seed=1, size=(40, 48), views=('2CH',), progress=False)


def test_resume_after_interruption(tmp_path):
    root = write_camus_phantom(tmp_path / 'c', n_patients=3, size=(40, 40), views=('4CH',), progress=False)
    import shutil
    shutil.rmtree(root / 'database_nifti' / 'patient0003')
    m = json.loads((root / 'phantom.json').read_text()); m['complete'] = False
    (root / 'phantom.json').write_text(json.dumps(m))
    write_camus_phantom(root, n_patients=3, size=(40, 40), views=('4CH',), progress=False)
    assert (root / 'database_nifti' / 'patient0003' / 'patient0003_4CH_half_sequence.nii.gz').exists()


def test_never_overwrites_foreign_data(tmp_path):
    foreign = tmp_path / 'real' / 'database_nifti' / 'patient0001'; foreign.mkdir(parents=True)
    (foreign / 'Info_2CH.cfg').write_text('ED: 1\n')
    with pytest.raises(FileExistsError, match='did not write'):
        write_camus_phantom(tmp_path / 'real', n_patients=2, size=(40, 40), progress=False)
    assert (foreign / 'Info_2CH.cfg').read_text() == 'ED: 1\n'


def _ellipse(a, c, sp):
    H, W = int(2 * c / sp[0]) + 10, int(2 * a / sp[1]) + 10
    Y, X = np.mgrid[0:H, 0:W]
    return (((X - W / 2 + 0.5) * sp[1] / a) ** 2 + ((Y - H / 2 + 0.5) * sp[0] / c) ** 2) < 1


def test_biplane_volume_ellipsoid_and_edge_cases():
    from usjepa.phantom import biplane_volume, ejection_fraction
    a, b, c = 18.0, 24.0, 42.0                                         # mm; prolate, long axis vertical
    v = biplane_volume(_ellipse(a, c, (0.3, 0.3)), _ellipse(b, c, (0.25, 0.3)), (0.3, 0.3), (0.25, 0.3))
    assert abs(v / (4 / 3 * np.pi * a * b * c / 1000) - 1) < 0.02
    tilted = np.rot90(_ellipse(a, c, (0.3, 0.3)).astype(np.uint8))    # axis found from the pixels, not assumed vertical
    assert abs(biplane_volume(tilted, _ellipse(b, c, (0.3, 0.3)), (0.3, 0.3), (0.3, 0.3)) / (4 / 3 * np.pi * a * b * c / 1000) - 1) < 0.02
    m2 = np.zeros((12, 8), bool); m2[1:11, 2:6] = True
    m4 = np.zeros((12, 8), bool); m4[1:11, 1:7] = True
    assert np.isclose(biplane_volume(m2, m4, (1, 1), (1, 1), n_discs=5), np.pi / 4 * 4 * 6 * 10 / 1000)
    assert np.isnan(biplane_volume(m2, np.zeros_like(m4), (1, 1), (1, 1)))
    assert ejection_fraction(100.0, 35.0) == 65.0 and np.isnan(ejection_fraction(0, 0))


def _cfg(path): return dict(l.split(': ', 1) for l in path.read_text().splitlines())


def test_cfg_ef_measured_by_biplane_from_the_written_masks(tmp_path):
    import nibabel as nib
    from usjepa.phantom import biplane_volume, ejection_fraction
    root = write_camus_phantom(tmp_path / 'c', n_patients=2, size=64, progress=False)   # an int size: square
    pdir = root / 'database_nifti' / 'patient0001'
    cfgs = {v: _cfg(pdir / f'Info_{v}.cfg') for v in ('2CH', '4CH')}
    assert cfgs['2CH']['EF'] == cfgs['4CH']['EF']                       # one heart, one EF
    def cavity(v, key):                                                 # independent reading of the files
        img = nib.load(str(pdir / f'patient0001_{v}_{key}_gt.nii.gz'))
        sx, sy = img.header.get_zooms()[:2]
        return np.asarray(img.dataobj).T == 1, (float(sy), float(sx))
    vol = {k: biplane_volume(*[cavity(v, k)[0] for v in ('2CH', '4CH')], *[cavity(v, k)[1] for v in ('2CH', '4CH')])
           for k in ('ED', 'ES')}
    assert abs(float(cfgs['2CH']['EF']) - ejection_fraction(vol['ED'], vol['ES'])) < 0.06
    assert 15 < float(cfgs['2CH']['EF']) < 85
    assert nib.load(str(pdir / 'patient0001_2CH_ED.nii.gz')).shape == (64, 64)


def test_size_forms(tmp_path):
    assert make_sequence(0, '2CH', n_frames=2, size=40)['video'].shape == (2, 40, 40)
    with pytest.raises(ValueError, match=r'int \(square'): write_camus_phantom(tmp_path / 'x', size=(1, 2, 3))
    with pytest.raises(ValueError, match=r'int \(square'): make_sequence(0, '2CH', size=None)


def test_torn_manifest_named(tmp_path):
    root = write_camus_phantom(tmp_path / 'c', n_patients=1, size=40, views=('2CH',), progress=False)
    assert not [p for p in root.iterdir() if p.name.endswith('.tmp.json')]   # no temporary left behind
    for torn in ('', '{"generator": "usjepa.ph'):
        (root / 'phantom.json').write_text(torn)
        with pytest.raises(ValueError, match='phantom.json.*torn'):
            write_camus_phantom(root, n_patients=1, size=40, views=('2CH',), progress=False)


def test_quality_labels_follow_the_realised_degradation():
    infos = [make_sequence(s, v, n_frames=2, size=(48, 48))['info'] for s in range(40) for v in ('2CH', '4CH')]
    q = [i['ImageQuality'] for i in infos]
    assert {'Good', 'Medium', 'Poor'} <= set(q) and q.count('Poor') < q.count('Medium')
    score = {g: np.mean([i['quality_score'] for i in infos if i['ImageQuality'] == g]) for g in ('Good', 'Medium', 'Poor')}
    assert score['Good'] < score['Medium'] < score['Poor']
    art = lambda g, k: np.mean([i['artefacts'][k] for i in infos if i['ImageQuality'] == g])
    assert art('Good', 'myo_contrast') > art('Poor', 'myo_contrast') and art('Good', 'clutter') < art('Poor', 'clutter')
    assert 0.15 < np.mean([i['artefacts']['la_cut'] for i in infos]) < 0.7     # the LA is cut in a share of views


def test_knobs_change_the_images_and_poses_vary():
    base = make_sequence(4, '4CH', n_frames=3, size=(64, 64))
    calm = make_sequence(4, '4CH', n_frames=3, size=(64, 64), params=PhantomParams(tilt_deg=0, apex_shift=0))
    assert not np.array_equal(base['labels'], calm['labels'])
    hi = make_sequence(4, '4CH', n_frames=3, size=(64, 64), params=PhantomParams(myo_contrast=(3.0, 3.0)))
    v, l = hi['video'].astype(float), hi['labels']
    lo = make_sequence(4, '4CH', n_frames=3, size=(64, 64), params=PhantomParams(myo_contrast=(1.0, 1.0)))
    assert v[l == 2].mean() > lo['video'][lo['labels'] == 2].mean() + 10
    # pose and scale vary: LV centroid and size over patients
    cen, size = [], []
    for sd in range(12):
        l0 = make_sequence(sd, '2CH', n_frames=2, size=(64, 64))['labels'][0]
        yx = np.argwhere(l0 == 1); cen.append(yx.mean(0)); size.append(len(yx))
    assert np.std(np.array(cen)[:, 1]) > 2 and max(size) > 1.6 * min(size)


def test_speckle_moves_with_the_tissue():
    "Tissue speckle is correlated from frame to frame after following the motion; blood speckle is not."
    P = PhantomParams(translation_mm=0.0, wobble=0.0, hypokinesis=0.0, speckle_rho=(0.95, 0.95), clutter=(0, 0), reverb=(0, 0))
    s = make_sequence(6, '2CH', n_frames=24, size=(128, 128), params=P)
    v, l = s['video'].astype(float), s['labels']
    t = len(v) // 2
    def corr(mask):
        a, b = v[t][mask], v[t + 1][mask]
        return np.corrcoef(a, b)[0, 1]
    still = (l[t] == l[t + 1])
    assert corr(still & (l[t] == 1)) < 0.35                       # blood: new speckle every frame
    outside = still & (l[t] == 0) & (v[t] > 0)
    assert corr(outside) > 0.6                                    # tissue: the same speckle, moved a little


def test_params_are_part_of_the_data_set(tmp_path):
    root = write_camus_phantom(tmp_path / 'c', n_patients=1, size=40, views=('2CH',), progress=False,
                               params=PhantomParams(la_cut=1.0))
    assert json.loads((root / 'phantom.json').read_text())['params']['la_cut'] == 1.0
    with pytest.raises(FileExistsError, match='different'):
        write_camus_phantom(root, n_patients=1, size=40, views=('2CH',), progress=False)
