"Tests for usjepa.data: a phantom CAMUS folder read back, splits, label fractions, clips, eval coverage, bad input."
import gzip, shutil, warnings
from pathlib import Path
import numpy as np
import pytest
import torch

from usjepa.data import (CamusClips, read_sequence, find_camus_root, camus_split, label_fraction_patients,
                         clip_indices, eval_clips, max_clip_start, normalise, denormalise, VIEWS)
from usjepa.phantom import write_camus_phantom, write_nifti_sequence, make_sequence, _patient_seed

SIZE = (48, 56)   # non-square on purpose: a transposed reader would give (56, 48)


@pytest.fixture(scope='module')
def camus(tmp_path_factory):
    return write_camus_phantom(tmp_path_factory.mktemp('data') / 'CAMUS_public', n_patients=10, size=SIZE, progress=False)


def copy_root(camus, tmp_path):
    dst = tmp_path / 'c'; shutil.copytree(camus, dst); return dst


# ---------- reading back ----------
def test_read_back_matches_generator(camus):
    for pid_i, view in [(1, '2CH'), (4, '4CH')]:
        seq = read_sequence(camus / 'database_nifti' / f'patient{pid_i:04d}', view)
        ref = make_sequence(_patient_seed(0, pid_i), view, size=SIZE)
        assert seq['video'].shape == ref['video'].shape and seq['video'].shape[1:] == SIZE
        np.testing.assert_array_equal(seq['video'], ref['video'])
        np.testing.assert_array_equal(seq['labels'], ref['labels'])
        assert seq['info']['NbFrame'] == len(ref['video']) and seq['info']['ED'] == ref['info']['ED']
        assert seq['info']['ImageQuality'] in ('Good', 'Medium', 'Poor')
        np.testing.assert_allclose(seq['spacing'], ref['info']['spacing'], rtol=1e-5)


def test_marker_orientation(tmp_path):
    "A marker written at (frame 3, row 5, col 40) of a (F,H,W) video must come back there; apex row above LA row."
    F_, H, W = 6, 30, 50
    video = np.zeros((F_, H, W), np.uint8); labels = np.zeros((F_, H, W), np.uint8)
    video[3, 5, 40] = 255; labels[:, 2:8, 20:30] = 1; labels[:, 20:26, 20:30] = 3
    pdir = tmp_path / 'database_nifti' / 'patient0001'
    write_nifti_sequence(pdir, '2CH', video, labels, dict(ED=1, ES=F_, spacing=(0.3, 0.2)))
    import nibabel as nib
    raw = nib.load(str(pdir / 'patient0001_2CH_half_sequence.nii.gz'))
    assert raw.shape == (W, H, F_)                                  # stored like CAMUS: (width, height, frames)
    seq = read_sequence(pdir, '2CH')
    assert seq['video'].shape == (F_, H, W)
    assert np.argwhere(seq['video'] == 255).tolist() == [[3, 5, 40]]
    assert seq['spacing'] == pytest.approx((0.3, 0.2))            # (sy, sx) from pixdim (sx, sy)
    rows1 = np.nonzero((seq['labels'][0] == 1).any(1))[0]; rows3 = np.nonzero((seq['labels'][0] == 3).any(1))[0]
    assert rows1.max() < rows3.min()
    ed = nib.load(str(pdir / 'patient0001_2CH_ES_gt.nii.gz'))
    assert ed.shape == (W, H)


def test_find_root_variants(camus):
    assert find_camus_root(camus) == camus
    assert find_camus_root(camus.parent) == camus
    assert find_camus_root(camus / 'database_nifti') == camus


# ---------- splits and label fractions ----------
def test_official_split_files_used(camus):
    parts = {s: camus_split(camus, s) for s in ('train', 'val', 'test')}
    for s, f in [('train', 'training'), ('val', 'validation'), ('test', 'testing')]:
        listed = (camus / 'database_split' / f'subgroup_{f}.txt').read_text().split()
        assert parts[s] == sorted(listed)
    allp = sum(parts.values(), [])
    assert sorted(allp) == [f'patient{i:04d}' for i in range(1, 11)] and len(set(allp)) == 10


def test_seeded_split_without_files(camus, tmp_path):
    root = copy_root(camus, tmp_path); shutil.rmtree(root / 'database_split')
    a = {s: camus_split(root, s, seed=1) for s in ('train', 'val', 'test')}
    assert a == {s: camus_split(root, s, seed=1) for s in ('train', 'val', 'test')}     # deterministic
    assert sorted(sum(a.values(), [])) == [f'patient{i:04d}' for i in range(1, 11)]     # a partition
    assert (len(a['train']), len(a['val']), len(a['test'])) == (8, 1, 1)
    assert any(camus_split(root, 'train', seed=s) != a['train'] for s in range(2, 6))   # the seed matters


def test_incomplete_split_folder(camus, tmp_path):
    root = copy_root(camus, tmp_path); (root / 'database_split' / 'subgroup_testing.txt').unlink()
    with pytest.raises(FileNotFoundError, match='subgroup_testing.txt'): camus_split(root, 'train')


def test_split_lists_missing_patient_warns(camus, tmp_path):
    root = copy_root(camus, tmp_path)
    f = root / 'database_split' / 'subgroup_validation.txt'; f.write_text(f.read_text() + 'patient0999\n')
    with pytest.warns(UserWarning, match=r'1 of \d+ listed patients'): ids = camus_split(root, 'val')
    assert 'patient0999' not in ids


def test_label_fractions_nested():
    ids = [f'p{i:03d}' for i in range(37)]
    sub = [label_fraction_patients(ids, f, seed=3) for f in (0.1, 0.2, 0.5, 1.0)]
    assert [len(s) for s in sub] == [4, 8, 19, 37]                    # ceil(f * 37)
    for small, big in zip(sub, sub[1:]): assert set(small) <= set(big)
    assert sub[0] == label_fraction_patients(list(reversed(ids)), 0.1, seed=3)   # input order does not matter
    assert label_fraction_patients(ids, 0.01) and len(label_fraction_patients(ids, 0.01)) == 1
    with pytest.raises(ValueError, match='label fraction'): label_fraction_patients(ids, 1.5)


def test_dataset_label_fraction_by_patient(camus):
    full = CamusClips(camus, 'train', img_size=16, num_frames=4)
    part = CamusClips(camus, 'train', img_size=16, num_frames=4, label_fraction=0.5)
    assert set(part.patients) < set(full.patients) and len(part.patients) == 4
    assert {q['patient'] for q in part.sequences} == set(part.patients)
    assert len(part) == 2 * len(part.patients)                        # both views of each chosen patient


# ---------- clips ----------
@pytest.mark.parametrize('n,start', [(12, 0), (12, 3), (20, 2), (61, 0), (100, 39), (1, 0)])
def test_clip_indices_brute_force(n, start):
    got = clip_indices(n, 16, 4, start)
    want = []
    for k in range(16):                                              # independent loop: step, then hold the last frame
        f = start + 4 * k
        want.append(f if f < n else n - 1)
    assert got.tolist() == want and got.dtype == np.int64


def test_train_starts_cover_all_frames():
    for n in (7, 13, 30, 80):
        used = set()
        for s in range(max_clip_start(n) + 1): used |= set(clip_indices(n, 16, 4, s).tolist())
        assert used == set(range(n))
        assert max(clip_indices(n, 16, 4, max_clip_start(n))) == n - 1 or n <= 61


@pytest.mark.parametrize('n,T,step', [(1, 16, 4), (10, 16, 4), (19, 16, 4), (64, 16, 4), (97, 16, 4), (30, 8, 1), (5, 3, 7)])
def test_eval_clips_cover_each_frame_once(n, T, step):
    counts = np.zeros(n, int)
    for idx, valid in eval_clips(n, T, step):
        assert len(idx) == T and valid[0] and (idx < n).all()
        assert (np.diff(idx[valid]) == step).all()                   # the training frame step is kept
        assert (idx[~valid] == idx[valid][-1]).all()                 # padding repeats the last real frame
        np.add.at(counts, idx[valid], 1)
    assert (counts == 1).all()


def test_eval_dataset_covers_every_frame(camus):
    ds = CamusClips(camus, 'val', img_size=16, num_frames=8, frame_step=4, mode='eval')
    seen = {}
    for it in ds:
        assert it['labels'].shape == (8, 16, 16)
        for f in it['frame_idx'][it['valid']].tolist():
            k = (it['patient'], it['view'], f); seen[k] = seen.get(k, 0) + 1
    want = {(q['patient'], q['view'], f) for q in ds.sequences for f in range(q['n_frames'])}
    assert set(seen) == want and set(seen.values()) == {1}


def test_item_contents_and_resize(camus):
    ds = CamusClips(camus, 'train', views='4CH', img_size=24, num_frames=16, frame_step=4, augment=False)
    torch.manual_seed(0); it = ds[0]
    assert it['video'].shape == (3, 16, 24, 24) and it['video'].dtype == torch.float32
    assert it['labels'].shape == (16, 24, 24) and it['labels'].dtype == torch.int64
    assert set(it['labels'].unique().tolist()) <= {0, 1, 2, 3} and it['view'] == '4CH'
    seq = read_sequence(camus / 'database_nifti' / it['patient'], '4CH')
    idx = it['frame_idx'].numpy()
    assert idx.tolist() == clip_indices(len(seq['video']), 16, 4, int(idx[0])).tolist()
    assert it['valid'].tolist() == [i == 0 or idx[i] != idx[i - 1] for i in range(16)]
    # nearest resize of the labels: class fractions are preserved approximately
    src = np.bincount(seq['labels'][idx[0]].ravel(), minlength=4) / seq['labels'][0].size
    dst = np.bincount(it['labels'][0].numpy().ravel(), minlength=4) / 24 ** 2
    np.testing.assert_allclose(dst, src, atol=0.05)
    # grey value recovered from the normalised 3-channel video matches a bilinear resize of the frame
    g = denormalise(it['video'])[0].numpy() * 255
    ref = torch.nn.functional.interpolate(torch.tensor(seq['video'][idx[0]], dtype=torch.float32)[None, None],
                                          size=(24, 24), mode='bilinear', antialias=True)[0, 0].numpy()
    assert np.abs(g - ref).max() <= 1.0


def test_random_start_seeded_by_torch(camus):
    ds = CamusClips(camus, 'train', img_size=16, num_frames=4, frame_step=4)
    torch.manual_seed(5); a = [ds[0]['frame_idx'][0].item() for _ in range(20)]
    torch.manual_seed(5); b = [ds[0]['frame_idx'][0].item() for _ in range(20)]
    assert a == b and len(set(a)) > 1


def test_disk_cache_roundtrip_and_invalidation(camus, tmp_path):
    root = copy_root(camus, tmp_path); cache = tmp_path / 'cache'
    ds = CamusClips(root, 'test', img_size=16, num_frames=4, cache_dir=cache)
    v0, l0 = ds.arrays(0)
    files = sorted(cache.glob('*.npz')); assert len(files) == 1 and '_16.npz' in files[0].name
    ds2 = CamusClips(root, 'test', img_size=16, num_frames=4, cache_dir=cache, cache=False)
    v1, l1 = ds2.arrays(0)
    np.testing.assert_array_equal(v0, v1); np.testing.assert_array_equal(l0, l1)
    # rewrite the source with other content: the stale cache entry must not be used
    q = ds2.sequences[0]
    new = make_sequence(12345, q['view'], n_frames=q['n_frames'], size=SIZE)
    new['info'].update(ED=1, ES=q['n_frames'])
    write_nifti_sequence(q['files']['video'].parent, q['view'], new['video'], new['labels'], new['info'])
    v2, _ = ds2.arrays(0)
    assert not np.array_equal(v2, v0)




# ---------- bad input ----------
def test_missing_and_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match='does not exist'): CamusClips(tmp_path / 'nothing')
    (tmp_path / 'e' / 'database_nifti').mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match='no patientXXXX'): CamusClips(tmp_path / 'e')
    (tmp_path / 'f').mkdir()
    with pytest.raises(FileNotFoundError, match='no database_nifti'): find_camus_root(tmp_path / 'f')


def test_patient_missing_file(camus, tmp_path):
    root = copy_root(camus, tmp_path)
    pid = camus_split(root, 'train')[0]
    gone = root / 'database_nifti' / pid / f'{pid}_2CH_half_sequence_gt.nii.gz'; gone.unlink()
    with pytest.raises(FileNotFoundError, match=str(gone.name)): read_sequence(gone.parent, '2CH')
    with pytest.warns(UserWarning, match=r'skipped 1 of 16 sequences.*' + gone.name):
        ds = CamusClips(root, 'train', img_size=16, num_frames=4)
    assert len(ds.sequences) == 15 and (pid, '2CH') not in {(q['patient'], q['view']) for q in ds.sequences}


def test_corrupt_nifti(camus, tmp_path):
    root = copy_root(camus, tmp_path)
    pdir = root / 'database_nifti' / 'patient0002'
    f = pdir / 'patient0002_4CH_half_sequence.nii.gz'
    data = f.read_bytes(); f.write_bytes(data[: len(data) // 2])   # truncated download
    with pytest.raises(ValueError, match='patient0002_4CH_half_sequence.nii.gz.*corrupt'): read_sequence(pdir, '4CH')
    f.write_bytes(b'not a nifti at all')
    with pytest.raises(ValueError, match='patient0002_4CH_half_sequence.nii.gz'): read_sequence(pdir, '4CH')


def test_shape_mismatch(tmp_path):
    pdir = tmp_path / 'database_nifti' / 'patient0001'
    s = make_sequence(1, '2CH', n_frames=4, size=(40, 40))
    write_nifti_sequence(pdir, '2CH', s['video'], s['labels'], s['info'])
    from usjepa.phantom import _save_nifti
    _save_nifti(pdir / 'patient0001_2CH_half_sequence_gt.nii.gz', s['labels'][:3], (1, 1))
    with pytest.raises(ValueError, match=r'shape mismatch'): read_sequence(pdir, '2CH')


def test_label_values_out_of_range(tmp_path):
    pdir = tmp_path / 'database_nifti' / 'patient0001'
    s = make_sequence(1, '2CH', n_frames=4, size=(40, 40))
    lab = s['labels'].copy(); lab[1, 3, 3] = 7
    write_nifti_sequence(pdir, '2CH', s['video'], lab, s['info'])
    with pytest.raises(ValueError, match=r'half_sequence_gt.nii.gz: label values must be in 0..3, found \[7\]'):
        read_sequence(pdir, '2CH')


def test_unknown_view(camus):
    with pytest.raises(ValueError, match="'3CH'"): read_sequence(camus / 'database_nifti' / 'patient0001', '3CH')
    with pytest.raises(ValueError, match="'PLAX'"): CamusClips(camus, views=('2CH', 'PLAX'))
    with pytest.raises(ValueError, match='split'): camus_split(camus, 'training')
    with pytest.raises(ValueError, match='mode'): CamusClips(camus, mode='test')


def test_float_images_refused_unless_integer_valued(tmp_path):
    import nibabel as nib
    pdir = tmp_path / 'database_nifti' / 'patient0001'
    s = make_sequence(1, '2CH', n_frames=4, size=(40, 40))
    write_nifti_sequence(pdir, '2CH', s['video'], s['labels'], s['info'])
    f = pdir / 'patient0001_2CH_half_sequence.nii.gz'
    def save(arr): nib.save(nib.Nifti1Image(np.ascontiguousarray(arr.transpose(2, 1, 0)).astype(np.float32), np.eye(4)), str(f))
    save(s['video'].astype(np.float32))
    np.testing.assert_array_equal(read_sequence(pdir, '2CH')['video'], s['video'])
    save(s['video'] / 255.)                              # [0, 1] floats: today read as {0, 1}
    with pytest.raises(ValueError, match=r'half_sequence.nii.gz: image is stored as float32 with non-integer values in 0..0.98'):
        read_sequence(pdir, '2CH')
    v = s['video'].astype(np.float32); v[1, 2, 2] = np.nan
    save(v)
    with pytest.raises(ValueError, match=r'half_sequence.nii.gz: image holds 1 NaN'): read_sequence(pdir, '2CH')
    v[1, 2, 2] = -3.
    save(v)
    with pytest.raises(ValueError, match=r'found -3\.\.'): read_sequence(pdir, '2CH')


def test_augmentation_one_crop_per_clip_and_aligned_labels():
    from usjepa.data import augment_clip
    S, T = 16, 5
    yy, xx = np.meshgrid(np.arange(S), np.arange(S), indexing='ij')
    frames = np.stack([8 * xx + 20 * t for t in range(T)]).astype(np.uint8)
    labels = np.repeat((16 * yy + xx)[None], T, 0).astype(np.uint8)
    torch.manual_seed(0)
    seen_flip = set()
    for _ in range(20):
        f, l, p = augment_clip(frames, labels, S)
        f, l = f.int().numpy(), l.int().numpy()
        seen_flip.add(p['flip'])
        assert all(np.abs(f[t] - f[0] - 20 * t).max() <= 1 and (l[t] == l[0]).all() for t in range(T))
        sy, sx = l[0] // 16, l[0] % 16
        assert p['top'] <= sy.min() and sy.max() < p['top'] + p['height'] and p['left'] <= sx.min() and sx.max() < p['left'] + p['width']
        assert (np.diff(sx.mean(0)) <= 0).all() if p['flip'] else (np.diff(sx.mean(0)) >= 0).all()
        assert np.abs(f[0] - 8 * sx).max() <= 8
    assert seen_flip == {True, False}


def test_dataset_augments_train_only(camus):
    aug = CamusClips(camus, 'train', views='4CH', img_size=24, num_frames=4, frame_step=4)
    off = CamusClips(camus, 'train', views='4CH', img_size=24, num_frames=4, frame_step=4, augment=False)
    ev = CamusClips(camus, 'test', views='4CH', img_size=24, num_frames=4, frame_step=4, mode='eval', augment=True)
    assert aug.augment and not off.augment and not ev.augment
    torch.manual_seed(0); a = aug[0]
    torch.manual_seed(0); b = off[0]
    assert torch.equal(a['frame_idx'], b['frame_idx']) and not torch.equal(a['video'], b['video'])
    torch.manual_seed(0); a2 = aug[0]
    assert torch.equal(a['video'], a2['video']) and torch.equal(a['labels'], a2['labels'])
    assert set(a['labels'].unique().tolist()) <= {0, 1, 2, 3}
