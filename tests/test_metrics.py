"Tests for usjepa.metrics: each metric against brute force, hand-worked cases, empty masks, paired test."
import json
import numpy as np
import pytest
import torch
from scipy import stats
from usjepa.metrics import (METRICS, SegMetrics, frame_counts, frame_scores, load_metrics, paired_test,
                            results_table, scores_from_counts)


def brute(pred, target, c):
    "Reference: explicit loops over frames and pixels, sklearn-like 0/0 handling (both empty -> 1, else 0)."
    P, G = pred.reshape(-1, pred.shape[-2] * pred.shape[-1]), target.reshape(-1, pred.shape[-2] * pred.shape[-1])
    rows = []
    for p, g in zip(P, G):
        tp = fp = fn = 0
        for a, b in zip(p.tolist(), g.tolist()):
            tp += a == c and b == c
            fp += a == c and b != c
            fn += a != c and b == c
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
    for c in (1, 2, 3):
        ref = brute(pred, target, c)[valid.reshape(-1)]
        np.testing.assert_allclose(np.stack([sc[c][k] for k in METRICS], 1), ref)
    np.testing.assert_allclose(sc['mean']['dsc'], np.mean([sc[c]['dsc'] for c in (1, 2, 3)], 0))
    s = m.summary()
    np.testing.assert_allclose(s['LV epi']['ji']['mean'], brute(pred, target, 2)[valid.reshape(-1), 1].mean())
    np.testing.assert_allclose(s['mean']['dsc']['mean'], np.mean([s[n]['dsc']['mean'] for n in ('LV endo', 'LV epi', 'LA')]))


def test_hand_worked():
    # class 1: pred 3 px, label 2 px, overlap 1 -> TP=1 FP=2 FN=1
    p = np.array([[[1, 1, 1], [0, 3, 0]]])
    g = np.array([[[0, 0, 1], [1, 3, 3]]])
    k = frame_counts(p, g)
    assert (k[1]['tp'][0], k[1]['fp'][0], k[1]['fn'][0]) == (1, 2, 1)
    s = frame_scores(p, g)
    assert s[1]['dsc'][0] == pytest.approx(2 / 5) and s[1]['ji'][0] == pytest.approx(1 / 4)
    assert s[1]['ppv'][0] == pytest.approx(1 / 3) and s[1]['recall'][0] == pytest.approx(1 / 2)
    # class 3: pred 1 px, label 2 px, overlap 1 -> DSC 2/3, JI 1/2, PPV 1, recall 1/2
    assert [s[3][m][0] for m in METRICS] == pytest.approx([2 / 3, 1 / 2, 1.0, 1 / 2])
    # perfect prediction
    assert all(v[0] == 1.0 for v in frame_scores(g, g)[1].values())


def test_empty_cases():
    z = np.zeros((1, 4, 4), int); one = z.copy(); one[0, 1:3, 1:3] = 1
    empty_pred = frame_scores(z, one, classes=(1,))[1]
    empty_label = frame_scores(one, z, classes=(1,))[1]
    both = frame_scores(z, z, classes=(1,))[1]
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
    a = frame_scores(pa, target)[2]['ji']; b = frame_scores(pb, target)[2]['ji']
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
    assert len(lines) == 2 + 2 * 4
    assert lines[2].startswith('| good | LV endo | 4 | 1.000 ± 0.000')
    assert '| method 1 | mean | 4 | 0.000 ± 0.000' in tbl
    one = results_table({'x': m1}, metrics=('dsc',), classes=['mean'])
    assert one.splitlines()[-1] == '| x | mean | 4 | 1.000 ± 0.000 |'
    with pytest.raises(ValueError, match='unknown metrics'):
        results_table({'x': m1}, metrics=('hd95',))
