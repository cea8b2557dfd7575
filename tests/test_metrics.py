"Tests for usjepa.metrics: each metric against brute force, hand-worked cases, empty masks, paired test."
import configparser, json, math
from pathlib import Path
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage, stats
from usjepa.metrics import (METRICS, PAPER_NAMES, STRUCTURES, agreement, contour, contour_distances,
                            ef_summary, ef_table, frame_counts, frame_distances, frame_scores,
                            native_labels, plot_ef, scores_from_counts)
from usjepa.scores import SegMetrics, load_metrics, paired_test, results_table


def brute(pred, target, labels):
    "Reference: explicit loops over frames and pixels, sklearn-like 0/0 handling (both empty -> 1, else 0)."
    labels = {labels} if isinstance(labels, int) else set(labels)
    P, G = pred.reshape(-1, pred.shape[-2] * pred.shape[-1]), target.reshape(-1, pred.shape[-2] * pred.shape[-1])
    rows = []
    for p, g in zip(P, G):
        tp = fp = fn = 0
        for a, b in zip(p.tolist(), g.tolist()):
            tp += a in labels and b in labels
            fp += a in labels and b not in labels
            fn += a not in labels and b in labels
        e = 1.0 if tp + fp + fn == 0 else 0.0
        div = lambda n, d: n / d if d else e
        rows.append([div(2 * tp, 2 * tp + fp + fn), div(tp, tp + fp + fn), div(tp, tp + fp), div(tp, tp + fn)])
    return np.array(rows)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    pred = rng.integers(0, 4, (3, 4, 7, 6))
    target = rng.integers(0, 4, (3, 4, 7, 6))
    pred[0, 0][pred[0, 0] == 1] = 0          # empty prediction for class 1
    target[1, 1][target[1, 1] == 2] = 0      # empty label for class 2
    pred[2, 3][pred[2, 3] == 3] = 0; target[2, 3][target[2, 3] == 3] = 0   # both empty for class 3
    valid = rng.random((3, 4)) > 0.3
    m = SegMetrics()
    for b in range(3):   # accumulate batch by batch
        m.update(torch.from_numpy(pred[b:b + 1]), torch.from_numpy(target[b:b + 1]), valid[b:b + 1])
    assert len(m) == valid.sum()
    sc = m.scores()
    for name, labels in STRUCTURES.items():          # both conventions, CAMUS LV_epi = {1, 2} included
        ref = brute(pred, target, labels)[valid.reshape(-1)]
        np.testing.assert_allclose(np.stack([sc[name][k] for k in METRICS], 1), ref)
    paper = ('paper:LV endo', 'paper:myocardium', 'paper:LA'); camus = ('camus:LV_endo', 'camus:LV_epi', 'camus:LA')
    np.testing.assert_allclose(sc['paper:mean']['dsc'], np.mean([sc[c]['dsc'] for c in paper], 0))
    np.testing.assert_allclose(sc['camus:mean']['ji'], np.mean([sc[c]['ji'] for c in camus], 0))
    s = m.summary()
    np.testing.assert_allclose(s['paper:myocardium']['ji']['mean'], brute(pred, target, 2)[valid.reshape(-1), 1].mean())
    np.testing.assert_allclose(s['camus:LV_epi']['ji']['mean'], brute(pred, target, (1, 2))[valid.reshape(-1), 1].mean())
    np.testing.assert_allclose(s['paper:mean']['dsc']['mean'], np.mean([s[n]['dsc']['mean'] for n in paper]))
    assert 'mean' not in s and 'LV epi' not in s          # no unprefixed, ambiguous names


def test_hand_worked():
    # class 1: pred 3 px, label 2 px, overlap 1 -> TP=1 FP=2 FN=1
    p = np.array([[[1, 1, 1], [0, 3, 0]]])
    g = np.array([[[0, 0, 1], [1, 3, 3]]])
    k = frame_counts(p, g)['paper:LV endo']
    assert (k['tp'][0], k['fp'][0], k['fn'][0]) == (1, 2, 1)
    s = frame_scores(p, g)
    assert s['paper:LV endo']['dsc'][0] == pytest.approx(2 / 5) and s['paper:LV endo']['ji'][0] == pytest.approx(1 / 4)
    assert s['paper:LV endo']['ppv'][0] == pytest.approx(1 / 3) and s['paper:LV endo']['recall'][0] == pytest.approx(1 / 2)
    # class 3: pred 1 px, label 2 px, overlap 1 -> DSC 2/3, JI 1/2, PPV 1, recall 1/2
    assert [s['paper:LA'][m][0] for m in METRICS] == pytest.approx([2 / 3, 1 / 2, 1.0, 1 / 2])
    # CAMUS LV_epi {1, 2} vs its parts: a wall pixel predicted as cavity is right for LV_epi, wrong for both labels
    k = frame_counts(np.array([[[2, 2, 1]]]), np.array([[[1, 2, 0]]]))
    assert [int(k['camus:LV_epi'][c][0]) for c in ('tp', 'fp', 'fn')] == [2, 1, 0]
    assert [int(k['paper:LV endo'][c][0]) for c in ('tp', 'fp', 'fn')] == [0, 1, 1]
    assert [int(k['paper:myocardium'][c][0]) for c in ('tp', 'fp', 'fn')] == [1, 1, 0]
    # ints are labels in the paper convention
    assert list(frame_scores(p, g, structures=(1, 3))) == ['paper:LV endo', 'paper:LA']
    # perfect prediction
    assert all(v[0] == 1.0 for v in frame_scores(g, g)['camus:LV_epi'].values())


def test_empty_cases():
    z = np.zeros((1, 4, 4), int); one = z.copy(); one[0, 1:3, 1:3] = 1
    empty_pred = frame_scores(z, one, structures=(1,))['paper:LV endo']
    empty_label = frame_scores(one, z, structures=(1,))['paper:LV endo']
    both = frame_scores(z, z, structures=(1,))['paper:LV endo']
    assert [empty_pred[m][0] for m in METRICS] == [0, 0, 0, 0]
    assert [empty_label[m][0] for m in METRICS] == [0, 0, 0, 0]
    assert [both[m][0] for m in METRICS] == [1, 1, 1, 1]
    # no NaN can come out of the counts, whatever they are
    tp, fp, fn = np.meshgrid(np.arange(3), np.arange(3), np.arange(3))
    for v in scores_from_counts(tp.ravel(), fp.ravel(), fn.ravel()).values():
        assert np.isfinite(v).all() and (v >= 0).all() and (v <= 1).all()


def test_bad_input():
    with pytest.raises(ValueError, match='shape'):
        frame_scores(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))
    with pytest.raises(ValueError, match='valid'):
        SegMetrics().update(np.zeros((1, 2, 4, 4)), np.zeros((1, 2, 4, 4)), valid=np.ones(3, bool))
    with pytest.raises(ValueError, match='empty'):
        SegMetrics().summary()


def _batch_ids(patients, T):
    return dict(patient=patients, view=['4CH'] * len(patients), frame_idx=torch.arange(T).repeat(len(patients), 1))


def test_ids_pairing_and_json(tmp_path):
    rng = np.random.default_rng(3)
    target = rng.integers(0, 4, (2, 3, 8, 8))
    pa = np.where(rng.random(target.shape) < .8, target, 0)
    pb = np.where(rng.random(target.shape) < .6, target, 0)
    ids = _batch_ids(['p1', 'p2'], 3)
    ma = SegMetrics().update(pa, target, ids=ids)
    # method b sees the clips in the other order: pairing must follow ids, not position
    mb = SegMetrics().update(pb[::-1], target[::-1], ids=_batch_ids(['p2', 'p1'], 3))
    assert ma.ids[0] == ('p1', '4CH', 0)
    r = paired_test(ma, mb, metric='ji', cls=2)
    assert r == paired_test(ma, mb, metric='ji', cls='paper:myocardium')
    a = frame_scores(pa, target)['paper:myocardium']['ji']; b = frame_scores(pb, target)['paper:myocardium']['ji']
    assert r['p_value'] == pytest.approx(stats.wilcoxon(a, b).pvalue)
    assert r['mean_b'] == pytest.approx(b.mean()) and r['diff_mean'] == pytest.approx((a - b).mean())
    # JSON round trip keeps counts, ids and summary exactly; no silent overwrite
    pth = ma.to_json(tmp_path / 'a.json')
    back = SegMetrics.from_json(pth)
    assert back.ids == ma.ids and back.summary() == ma.summary()
    assert json.loads(pth.read_text())['summary']['n_frames'] == 6
    with pytest.raises(FileExistsError):
        ma.to_json(pth)
    ma.to_json(pth, overwrite=True)
    # different frame sets refuse to pair
    mc = SegMetrics().update(pb[:1], target[:1], ids=_batch_ids(['p1'], 3))
    with pytest.raises(ValueError, match='different frames'):
        paired_test(ma, mc)
    with pytest.raises(FileNotFoundError):
        load_metrics(tmp_path / 'missing.json')


def test_paired_test_known_example():
    # a textbook paired example (Wilcoxon 1945-style): compare with scipy directly
    a = np.array([125, 115, 130, 140, 140, 115, 140, 125, 140, 135], float)
    b = np.array([110, 122, 125, 120, 140, 124, 123, 137, 135, 145], float)
    r = paired_test(a, b, n_boot=2000, seed=1)
    assert r['p_value'] == pytest.approx(stats.wilcoxon(a, b).pvalue)
    assert r['mean_a'] == pytest.approx(a.mean()) and r['std_a'] == pytest.approx(a.std())
    assert r['ci95'][0] < r['diff_mean'] < r['ci95'][1]
    # bootstrap CI: seeded -> reproducible; matches a hand-rolled percentile bootstrap roughly
    assert paired_test(a, b, n_boot=2000, seed=1)['ci95'] == r['ci95']
    rng = np.random.default_rng(0); d = a - b
    means = d[rng.integers(0, d.size, (20000, d.size))].mean(1)
    assert r['ci95'] == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])), abs=1.5)
    # a clear shift gives a small p-value; identical inputs give p = 1 and a zero-width interval
    x = np.linspace(0.5, 0.9, 30)
    assert paired_test(x + 0.05 + 0.01 * np.sin(np.arange(30)), x)['p_value'] < 1e-4
    same = paired_test(x, x)
    assert same['p_value'] == 1.0 and same['ci95'] == (0.0, 0.0)
    with pytest.raises(ValueError, match='equal lengths'):
        paired_test(x, x[:-1])


def test_paired_test_by_sequence_and_patient():
    "Per-unit tests average each method over a sequence's (patient's) frames, then compare the means."
    rng = np.random.default_rng(3)
    ids = [(f'p{p}', v, f) for p in range(4) for v in ('2CH', '4CH') for f in range(0, 4 * (p + 2), 4)]
    def saved(dice):                          # a saved-metrics dict with class-1 Dice `dice` per frame
        tp = np.round(np.asarray(dice) * 10000).astype(int)
        return dict(classes={'1': 'LV endo'}, per_frame=dict(ids=[list(i) for i in ids],
                    counts={'1': dict(tp=tp.tolist(), fp=(20000 - 2 * tp).tolist(), fn=[0] * len(tp))}))
    da, db = rng.uniform(.6, .9, len(ids)), rng.uniform(.6, .9, len(ids))
    da, db = np.round(da * 10000) / 10000, np.round(db * 10000) / 10000
    for by, key in (('sequence', lambda i: i[:2]), ('patient', lambda i: i[0])):
        units = sorted({key(i) for i in ids})
        ma = [np.mean([x for i, x in zip(ids, da) if key(i) == u]) for u in units]     # brute force
        mb = [np.mean([x for i, x in zip(ids, db) if key(i) == u]) for u in units]
        r = paired_test(saved(da), saved(db), cls=1, by=by, n_boot=500)
        assert r['by'] == by and r['n'] == len(units) == (8 if by == 'sequence' else 4)
        assert r['mean_a'] == pytest.approx(np.mean(ma)) and r['std_b'] == pytest.approx(np.std(mb))
        assert r['p_value'] == pytest.approx(stats.wilcoxon(ma, mb).pvalue)
    # frames are paired by id, whatever their order in each file
    shuffled = saved(db); order = rng.permutation(len(ids))
    for k in ('tp', 'fp', 'fn'): shuffled['per_frame']['counts']['1'][k] = [shuffled['per_frame']['counts']['1'][k][j] for j in order]
    shuffled['per_frame']['ids'] = [shuffled['per_frame']['ids'][j] for j in order]
    assert paired_test(saved(da), shuffled, cls=1, by='sequence', n_boot=500) == paired_test(saved(da), saved(db), cls=1, by='sequence', n_boot=500)
    with pytest.raises(ValueError, match=r'\(patient, view, frame\)'): paired_test(da, db, by='sequence')
    with pytest.raises(ValueError, match="by must be"): paired_test(da, db, by='clip')


def test_results_table(tmp_path):
    rng = np.random.default_rng(4)
    target = rng.integers(0, 4, (1, 4, 8, 8))
    m1 = SegMetrics().update(target, target)
    m2 = SegMetrics().update(np.zeros_like(target), target)
    m1.to_json(tmp_path / 'good.json')
    tbl = results_table([tmp_path / 'good.json', m2.to_dict()])
    lines = tbl.splitlines()
    assert len(lines) == 2 + 2 * 8                        # 2 conventions x (3 structures + mean) per method
    assert lines[2].startswith('| good | paper:LV endo | 4 | 1.000 ± 0.000')
    assert '| method 1 | camus:mean | 4 | 0.000 ± 0.000' in tbl
    one = results_table({'x': m1}, metrics=('dsc',), structures=['camus:mean'])
    assert one.splitlines()[-1] == '| x | camus:mean | 4 | 1.000 ± 0.000 |'
    assert [l.split(' | ')[1] for l in results_table({'x': m1}, structures='camus').splitlines()[2:]] == \
        ['camus:LV_endo', 'camus:LV_epi', 'camus:LA', 'camus:mean']
    with pytest.raises(ValueError, match='unknown metrics'):
        results_table({'x': m1}, metrics=('hd95',))


# ---- native resolution -------------------------------------------------------------------------------

def brute_bilinear(x, H, W):
    "PyTorch's bilinear resize with align_corners=False, by loops: (C, h, w) -> (C, H, W)."
    C, h, w = x.shape
    def taps(j, n_in, n_out):
        s = max((j + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(math.floor(s)), n_in - 1)
        return i0, min(i0 + 1, n_in - 1), s - i0
    out = np.zeros((C, H, W))
    for c in range(C):
        for r in range(H):
            r0, r1, a = taps(r, h, H)
            for q in range(W):
                q0, q1, b = taps(q, w, W)
                out[c, r, q] = ((1 - a) * ((1 - b) * x[c, r0, q0] + b * x[c, r0, q1]) +
                                a * ((1 - b) * x[c, r1, q0] + b * x[c, r1, q1]))
    return out


def test_native_labels_hand_worked_ramp():
    # class-1 logit x - 1.2 on 4 columns: upsampled x4 the logits cross at source 1.2 -> output column 6.3
    ramp = torch.stack([torch.zeros(1, 4), torch.arange(4.).view(1, 4) - 1.2])
    assert native_labels(ramp, (1, 16))[0].tolist() == [0] * 7 + [1] * 9
    nearest = F.interpolate(ramp.argmax(0)[None, None].float(), size=(1, 16), mode='nearest')[0, 0, 0]
    assert nearest.tolist() == [0] * 8 + [1] * 8            # labels upsampled: a whole source pixel coarser


def test_native_labels_disc_against_loops():
    # a disc of radius 5 (native 40x40), logits = signed distances on a 10x10 grid: bilinear then argmax
    yy, xx = np.mgrid[:10, :10] * 4 + 1.5                      # low-res pixel centres in native coordinates
    inside = 5.0 - np.hypot(yy - 20, xx - 20)
    logits = np.stack([np.zeros_like(inside), inside, -np.ones_like(inside)])      # 3 classes
    up = native_labels(torch.tensor(logits, dtype=torch.float32), (40, 40))
    assert up.shape == (40, 40) and up.dtype == torch.int64
    ref = brute_bilinear(logits, 40, 40).argmax(0)
    assert (up.numpy() == ref).all()
    nearest = F.interpolate(torch.tensor(logits).argmax(0)[None, None].float(), size=(40, 40), mode='nearest')[0, 0].long()
    assert (nearest.numpy() != up.numpy()).any()              # argmax after bilinear is not nearest on labels
    truth = np.hypot(*np.mgrid[:40, :40] - 19.5) <= 5.0        # the true disc on the native grid
    dsc = lambda m: 2 * (m & truth).sum() / (m.sum() + truth.sum())
    assert dsc(up.numpy() == 1) > dsc(nearest.numpy() == 1)
    # a stack of frames (T, C, H', W') gives (T, H, W), frame by frame
    stack = native_labels(torch.tensor(np.stack([logits, logits[::-1].copy()]), dtype=torch.float32), (40, 40))
    assert stack.shape == (2, 40, 40) and (stack[0] == up).all()
    with pytest.raises(ValueError, match='logits must be'):
        native_labels(torch.zeros(10, 10), (4, 4))


# ---- contour distances ---------------------------------------------------------------------------------

def brute_contour(m):
    H, W = m.shape
    return [(r, c) for r in range(H) for c in range(W) if m[r, c] and any(
        not (0 <= r + dr < H and 0 <= c + dc < W) or not m[r + dr, c + dc] for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)))]


def brute_hd_mad(pm, gm, sp):
    "Nearest-point search over every pair of boundary pixels, in mm."
    A, B = brute_contour(pm), brute_contour(gm)
    if not A and not B: return 0.0, 0.0
    if not A or not B: return math.nan, math.nan
    d = lambda p, q: math.hypot(sp[0] * (p[0] - q[0]), sp[1] * (p[1] - q[1]))
    dab = [min(d(a, b) for b in B) for a in A]
    dba = [min(d(b, a) for a in A) for b in B]
    return max(max(dab), max(dba)), (sum(dab) / len(dab) + sum(dba) / len(dba)) / 2


@pytest.mark.parametrize('seed', [0, 1, 2, 3])
def test_contour_distances_brute_force(seed):
    rng = np.random.default_rng(seed)
    sp = (0.31, 0.77)                                         # anisotropic: rows and columns differ
    for _ in range(4):
        pm = ndimage.binary_opening(rng.random((13, 11)) < .55)
        gm = ndimage.binary_opening(rng.random((13, 11)) < .55)
        pm[0, :3] = gm[-1, -2:] = True                        # touching the image edge
        assert set(zip(*np.nonzero(contour(pm)))) == set(brute_contour(pm))
        assert contour_distances(pm, gm, sp) == pytest.approx(brute_hd_mad(pm, gm, sp), abs=1e-9)
        assert contour_distances(gm, pm, sp) == pytest.approx(contour_distances(pm, gm, sp))   # symmetric


def test_contour_distances_empty_and_hand_worked():
    z = np.zeros((6, 6), bool); sq = z.copy(); sq[1:4, 1:4] = True
    assert contour_distances(z, z, (0.5, 0.5)) == (0.0, 0.0)
    assert all(math.isnan(v) for v in contour_distances(sq, z)) and all(math.isnan(v) for v in contour_distances(z, sq))
    # a 3x3 square vs itself shifted 2 rows down, rows 2 mm: 3 pixels shared, 2 at 2 mm, 3 at 4 mm, both ways
    assert contour_distances(np.roll(sq, 2, axis=0), sq, (2.0, 1.0)) == pytest.approx((4.0, (2 * 2 + 3 * 4) / 8))
    with pytest.raises(ValueError, match='spacing'):
        contour_distances(sq, sq, (0.0, 1.0))
    # per-frame, per-structure: LV_epi {1, 2} uses the union of both labels
    pred = np.zeros((2, 8, 8), int); pred[:, 2:6, 2:6] = 2; pred[:, 3:5, 3:5] = 1
    target = pred.copy(); target[1] = np.roll(target[1], 1, axis=1)
    d = frame_distances(pred, target, [(1.0, 0.5), (1.0, 0.25)])
    assert d['camus:LV_epi']['hd'].tolist() == pytest.approx([0.0, 0.25])
    exp = brute_hd_mad(np.isin(pred[1], (1, 2)), np.isin(target[1], (1, 2)), (1.0, 0.25))
    assert (d['camus:LV_epi']['hd'][1], d['camus:LV_epi']['mad'][1]) == pytest.approx(exp)
    assert math.isnan(d['paper:LA']['hd'][0]) is False and d['paper:LA']['hd'][0] == 0.0     # LA absent in both


# ---- SegMetrics: spacing, distances, ED/ES, JSON ------------------------------------------------------

def _clips(seed=0):
    "Two clips (2CH, 4CH of one patient) of 3 frames: blobs of labels 1, 2, 3; the prediction perturbed."
    rng = np.random.default_rng(seed)
    target = np.zeros((2, 3, 16, 14), int)
    for b in range(2):
        for t in range(3):
            target[b, t, 2:10, 3:11] = 2; target[b, t, 3 + t // 2:9, 4:10] = 1; target[b, t, 11:15, 4:10] = 3
    pred = target.copy()
    flip = rng.random(pred.shape) < .08
    pred[flip] = rng.integers(0, 4, flip.sum())
    pred[1, 2][pred[1, 2] == 3] = 0                           # LA missed in one frame: undefined distances
    return pred, target


def test_distances_phases_summary_and_json(tmp_path):
    pred, target = _clips()
    ids = dict(patient=['p1', 'p1'], view=['2CH', '4CH'], frame_idx=torch.tensor([[0, 1, 2], [0, 1, 2]]))
    spacing = np.array([[0.3, 0.2], [0.35, 0.25]])
    m = SegMetrics(ed_es={('p1', '2CH'): dict(ED=0, ES=2)})   # 2CH by index map, 4CH by per-frame tags
    m.update(pred, target, ids=ids, spacing=spacing, phase=[[None, None, None], ['ED', None, 'ES']])
    assert m.phase == ['ED', None, 'ES', 'ED', None, 'ES']
    # per-frame distances against brute force
    for name, labels in STRUCTURES.items():
        d = m.distances(name)
        for k, (b, t) in enumerate((b, t) for b in range(2) for t in range(3)):
            exp = brute_hd_mad(np.isin(pred[b, t], labels), np.isin(target[b, t], labels), spacing[b])
            got = (d['hd'][k], d['mad'][k])
            assert (np.isnan(got).all() and np.isnan(exp).all()) or got == pytest.approx(exp)
    s = m.summary()
    la = m.distances('camus:LA')['hd']
    assert s['camus:LA']['hd'] == dict(mean=pytest.approx(np.nanmean(la)), std=pytest.approx(np.nanstd(la)),
                                       n=5, n_undefined=1)
    # ED / ES summaries: the same numbers as scoring those frames alone
    for ph, frames in (('ED', [0, 3]), ('ES', [2, 5])):
        sub = SegMetrics().update(pred.reshape(6, 16, 14)[frames][:, None], target.reshape(6, 16, 14)[frames][:, None],
                                  spacing=np.repeat(spacing, 3, 0)[frames])
        ss = sub.summary()
        assert s[ph]['n_frames'] == 2
        for name in ('paper:myocardium', 'camus:LV_epi', 'camus:mean'):
            assert s[ph][name]['dsc'] == pytest.approx(ss[name]['dsc'])
        assert s[ph]['camus:LV_epi']['mad'] == pytest.approx(ss['camus:LV_epi']['mad'])
    # conflicting tags are refused
    with pytest.raises(ValueError, match="ed_es says 'ED'"):
        SegMetrics(ed_es={('p1', '2CH'): dict(ED=0, ES=2)}).update(pred, target, ids=ids, phase=[['ES'] + [None] * 2, [None] * 3])
    with pytest.raises(ValueError, match='phase must be'):
        SegMetrics().update(pred, target, phase=[['ed'] * 3] * 2)
    # saved JSON: strict JSON, phases, spacing, distances per frame per structure (null = undefined)
    p = m.to_json(tmp_path / 'run' / 'metrics.json')
    d = json.loads(p.read_text())
    assert d['format'] == 2 and d['structures']['camus:LV_epi'] == [1, 2]
    assert d['per_frame']['phase'] == m.phase and d['per_frame']['spacing'][3] == [0.35, 0.25]
    assert d['per_frame']['distances']['camus:LA']['hd'][5] is None
    assert 'NaN' not in p.read_text()
    back = load_metrics(tmp_path / 'run')                     # a run folder works too
    assert back.summary() == m.summary() and back.phase == m.phase and back.spacing == m.spacing
    # frames without a spacing have no distances and are not "undefined"
    nosp = SegMetrics().update(pred, target)
    assert 'hd' not in nosp.summary()['camus:LA'] and np.isnan(nosp.distances('camus:LA')['hd']).all()


def test_old_format_file_loads(tmp_path):
    "A metrics.json written before structures existed (per-label counts) still loads, as paper: structures."
    old = dict(classes={'1': 'LV endo', '2': 'LV epi', '3': 'LA'},
               per_frame=dict(ids=[['p1', '2CH', 0], ['p1', '2CH', 1]],
                              counts={c: dict(tp=[5, 6], fp=[1, 0], fn=[0, 2]) for c in '123'}))
    (tmp_path / 'metrics.json').write_text(json.dumps(old))
    m = load_metrics(tmp_path / 'metrics.json')
    assert list(m.structures) == ['paper:LV endo', 'paper:myocardium', 'paper:LA']
    assert m.scores()['paper:myocardium']['dsc'].tolist() == pytest.approx([10 / 11, 12 / 14])
    assert paired_test(m, m, cls=2)['p_value'] == 1.0


# ---- fixes -------------------------------------------------------------------------------------------

def test_auto_ids_unique_when_valid_drops_frames():
    rng = np.random.default_rng(5)
    target = rng.integers(0, 4, (2, 3, 6, 6)); pred = rng.integers(0, 4, (2, 3, 6, 6))
    gap = np.array([[True, False, True]])                     # a dropped frame mid-clip
    m = SegMetrics().update(pred[:1], target[:1], gap).update(pred[1:], target[1:], gap)
    assert m.ids == [('frame', 0), ('frame', 2), ('frame', 3), ('frame', 5)]
    assert paired_test(m, m)['n'] == 4                        # used to fail: "frame ids are not unique"
    again = SegMetrics.from_dict(m.to_dict()).update(pred[:1], target[:1])
    assert len(set(again.ids)) == len(again) == 7             # numbering continues after a reload


@pytest.mark.parametrize('bad, shown', [(255, '255'), (np.nan, 'nan'), (1.5, '1.5'), (-1, '-1'), (4, '4')])
def test_label_values_outside_0_to_3_raise(bad, shown):
    ok = np.zeros((1, 2, 4, 4)); ok[0, 0, 1:3, 1:3] = 1
    wrong = ok.copy(); wrong[0, 1, 0, 0] = bad
    for p, t, who in ((wrong, ok, 'pred'), (ok, wrong, 'target')):
        with pytest.raises(ValueError, match=rf"{who}: label values must be in \(0, 1, 2, 3\), found \[{shown}"):
            SegMetrics().update(p, t)
        with pytest.raises(ValueError, match=shown):
            frame_scores(p[0], t[0])
    assert SegMetrics().update(ok.astype(np.float32), ok).summary()['n_frames'] == 2     # integral floats are fine


def test_results_table_keys_runs_by_folder(tmp_path):
    rng = np.random.default_rng(6)
    target = rng.integers(0, 4, (1, 3, 8, 8))
    for run, pred in (('a', target), ('b', np.zeros_like(target))):
        SegMetrics().update(pred, target).to_json(tmp_path / run / 'metrics.json')
    tbl = results_table([tmp_path / 'a' / 'metrics.json', tmp_path / 'b' / 'metrics.json'], structures='paper')
    assert [l.split(' | ')[0][2:] for l in tbl.splitlines()[2:]] == ['a'] * 4 + ['b'] * 4
    assert '| a | paper:LV endo | 3 | 1.000 ± 0.000' in tbl and '| b | paper:LV endo | 3 | 0.000 ± 0.000' in tbl
    assert results_table([tmp_path / 'a'], structures='paper').splitlines()[2].startswith('| a |')   # a run folder
    SegMetrics().update(target, target).to_json(tmp_path / 'x' / 'a' / 'metrics.json')
    with pytest.raises(ValueError, match=r"both named \['a'\]"):
        results_table([tmp_path / 'a' / 'metrics.json', tmp_path / 'x' / 'a' / 'metrics.json'])


def test_results_table_distances_and_phase():
    pred, target = _clips()
    m = SegMetrics().update(pred, target, spacing=(0.3, 0.2), phase=[['ED', None, 'ES']] * 2)
    tbl = results_table({'m': m}, structures=['camus:LA'], digits=2)
    assert tbl.splitlines()[0] == '| method | structure | frames | DSC | JI | PPV | Recall | HD (mm) | MAD (mm) |'
    s = m.summary()['camus:LA']['hd']
    assert tbl.splitlines()[2].split(' | ')[-2] == f"{s['mean']:.2f} ± {s['std']:.2f} (1 undef.)"
    es = results_table({'m': m}, phase='ES', metrics=('dsc',), structures='camus').splitlines()
    assert es[2].startswith('| m | camus:LV_endo | 2 |')
    with pytest.raises(ValueError, match="no frames tagged 'ED'"):
        results_table({'n': SegMetrics().update(pred, target)}, phase='ED')


def test_scipy_minimum_declared():
    "paired_test passes rng= to scipy.stats.bootstrap, which needs scipy >= 1.15."
    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).parents[1] / 'settings.ini')
    assert 'scipy>=1.15' in cfg['DEFAULT']['requirements'].split()


# ---- ejection fraction ---------------------------------------------------------------------------------

def test_agreement_hand_worked():
    # differences -5, 2, 0: MAE 7/3, bias -1, sample std sqrt(26/2); r from centred (0, 10, -10), (4, 7, -11)
    a = agreement([50, 60, 40], [55, 58, 40])
    assert a == dict(n=3, mae=pytest.approx(7 / 3), bias=pytest.approx(-1), std=pytest.approx(13 ** .5),
                     r=pytest.approx(180 / (200 * 186) ** .5))
    assert a['r'] == pytest.approx(stats.pearsonr([50, 60, 40], [55, 58, 40]).statistic)
    assert agreement([1, None, 3], [2, 5, float('nan')])['n'] == 1
    assert agreement([1, 2], [3, 3])['r'] is None and agreement([], [])['mae'] is None


def _ellipse(ry, rx, shape=(120, 80)):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return ((yy - 60) / ry) ** 2 + ((xx - 40) / rx) ** 2 <= 1


def test_ef_table_and_summary():
    from usjepa.phantom import biplane_volume
    # sanity of the volume (the only biplane check here): a spheroid of semi-axes 20 x 8 x 8 mm
    ell = _ellipse(40, 16)
    assert biplane_volume(ell, ell, (0.5, 0.5), (0.5, 0.5)) == pytest.approx(4 / 3 * math.pi * 20 * 8 * 8 / 1000, rel=0.03)
    cases, sizes = {}, {'p1': (44, 30, 40, 30), 'p2': (40, 34, 36, 33)}       # ref ED, ref ES, pred ED, pred ES radii
    for p, (red, res, ped, pes) in sizes.items():
        for v in ('2CH', '4CH'):
            for ph, rr, pr in (('ED', red, ped), ('ES', res, pes)):
                cases[(p, v, ph)] = dict(pred=_ellipse(pr, pr / 2.5), ref=_ellipse(rr, rr / 2.5).astype(np.uint8), spacing=(0.4, 0.4))
    rows = ef_table(cases, reference_ef={'p1': 55.0})
    assert [r['patient'] for r in rows] == ['p1', 'p2'] and rows[0]['ef_cfg'] == 55.0 and rows[1]['ef_cfg'] is None
    for r in rows:
        c = lambda ph, src: cases[(r['patient'], '2CH', ph)][src]
        assert r['edv_ref'] == pytest.approx(biplane_volume(c('ED', 'ref'), c('ED', 'ref'), (0.4, 0.4), (0.4, 0.4)))
        assert r['ef_pred'] == pytest.approx(100 * (r['edv_pred'] - r['esv_pred']) / r['edv_pred'])
    s = ef_summary(rows)
    d = [r['ef_pred'] - r['ef_ref'] for r in rows]
    assert s['ef']['mae'] == pytest.approx(np.mean(np.abs(d))) and s['ef']['bias'] == pytest.approx(np.mean(d))
    assert s['ef_vs_cfg']['n'] == 1 and s['ef_vs_cfg']['bias'] == pytest.approx(rows[0]['ef_pred'] - 55.0)
    with pytest.raises(ValueError, match=r"patient 'p3': no masks for \['4CH ED', '4CH ES'\]"):
        ef_table({**cases, ('p3', '2CH', 'ED'): cases[('p1', '2CH', 'ED')], ('p3', '2CH', 'ES'): cases[('p1', '2CH', 'ES')]})
    assert len(ef_table({**cases, ('p3', '2CH', 'ED'): cases[('p1', '2CH', 'ED')]}, strict=False)) == 2
    fig = plot_ef(rows); assert len(fig.axes) == 1
    import matplotlib.pyplot as plt; plt.close(fig)


def test_segmetrics_collects_ed_es_masks_for_ef(tmp_path):
    frames = {ph: np.stack([np.where(_ellipse(r, r / 2.5), 1, 0) for r in (44, 38, 32)]) for ph in ('x',)}['x']
    target = np.stack([frames, frames])                       # (2 views, 3 frames, H, W): cavity shrinks
    pred = np.roll(target, 1, axis=-1)
    ids = dict(patient=['p9', 'p9'], view=['2CH', '4CH'], frame_idx=torch.arange(3).repeat(2, 1))
    m = SegMetrics(ed_es={('p9', v): dict(ED=0, ES=2) for v in ('2CH', '4CH')}, reference_ef={'p9': 50.0})
    m.update(pred, target, ids=ids, spacing=(0.4, 0.4))
    assert sorted(m.lv) == [('p9', v, ph) for v in ('2CH', '4CH') for ph in ('ED', 'ES')]
    assert m.lv[('p9', '4CH', 'ES')]['ref'].sum() == (target[1, 2] == 1).sum()          # cropped to the cavities' box
    rows = ef_table(m)
    assert len(rows) == 1 and rows[0]['ef_cfg'] == 50.0 and 40 < rows[0]['ef_ref'] < 70
    s = m.summary()['EF']
    assert s['ef']['n'] == 1 and s['ef_vs_cfg']['bias'] == pytest.approx(rows[0]['ef_pred'] - 50.0)
    with pytest.raises(ValueError, match='scored twice'):
        m.update(pred[:1], target[:1], ids=dict(patient=['p9'], view=['2CH'], frame_idx=torch.arange(3)[None]), spacing=(0.4, 0.4))
    back = load_metrics(m.to_json(tmp_path / 'metrics.json'))      # EF rows are saved with the file
    assert ef_table(back) == rows and back.summary()['EF'] == m.summary()['EF']
