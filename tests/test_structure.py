"The notebooks are a lesson in reading order: each teaches one idea and uses only what earlier notebooks define."
import json, re
from pathlib import Path

NBS = Path(__file__).resolve().parents[1] / 'nbs'
NUMBERED = sorted(NBS.glob('[0-9][0-9]_*.ipynb'))

def cells(nb): return json.loads(nb.read_text())['cells']
def src(c): return ''.join(c['source'])

def module_of(nb):
    "The module a notebook exports (its `#| default_exp`), or None."
    for c in cells(nb):
        m = re.search(r'^#\| default_exp (\w+)', src(c), re.M)
        if m: return m.group(1)

def test_numbers_have_no_gaps():
    assert [int(p.name[:2]) for p in NUMBERED] == list(range(len(NUMBERED)))

def test_no_notebook_uses_a_later_one():
    order = {module_of(p): int(p.name[:2]) for p in NUMBERED}
    bad = []
    for p in NUMBERED:
        n = int(p.name[:2])
        for c in cells(p):
            if c['cell_type'] != 'code': continue
            for mod in re.findall(r'\busjepa\.(\w+)', src(c)):
                if mod in order and order[mod] > n: bad.append(f"{p.name} uses usjepa.{mod} ({order[mod]:02d})")
    assert not bad, bad

def test_each_notebook_starts_with_its_one_idea():
    for p in NUMBERED:
        first = src(cells(p)[0])
        assert cells(p)[0]['cell_type'] == 'markdown' and first.startswith('# '), p.name
        assert re.search(r'^> \S', first, re.M), f"{p.name}: the first cell needs a '> one idea' line"
        assert module_of(p), f"{p.name} exports no module"

def test_links_between_notebooks_resolve():
    "A markdown link to another notebook names a notebook that exists (renumbering breaks them otherwise)."
    link = re.compile(r'\]\((?![a-z]+:|/|#)([^)#]+\.ipynb)(?:#[^)]*)?\)')
    bad = [f"{p.name} -> {t}" for p in sorted(NBS.glob('*.ipynb')) for c in cells(p) if c['cell_type'] == 'markdown'
           for t in link.findall(src(c)) if not (NBS / t).exists()]
    assert not bad, bad

def exported_cells(nb):
    "(non-blank lines without `#|` directives, top-level definitions) of each exported code cell that is not imports only."
    import ast
    for c in cells(nb):
        s = src(c)
        if c['cell_type'] != 'code' or not re.search(r'^#\|\s*exports?\b', s, re.M): continue
        body = '\n'.join(l for l in s.splitlines() if not l.startswith('#|'))
        tree = ast.parse(body)
        if all(isinstance(n, (ast.Import, ast.ImportFrom)) for n in tree.body): continue
        defs = sum(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) for n in tree.body)
        yield len([l for l in body.splitlines() if l.strip()]), defs

def grain(nbs):
    import statistics
    rows = [r for p in nbs for r in exported_cells(p)]
    lines = [n for n, _ in rows]
    return dict(median=statistics.median(lines), max=max(lines), multi=sum(d > 1 for _, d in rows) / len(rows))

def test_cells_have_the_grain_of_a_lesson():
    "One idea per exported cell, as in fastcore's notebooks: median <= 12 lines, none over 60, <= 25 % with several definitions."
    g = grain(NUMBERED)
    over = [(p.name, n) for p in NUMBERED for n, _ in exported_cells(p) if n > 60]
    assert g['median'] <= 12, g
    assert not over, f"exported cells over 60 lines: {over}"
    assert g['multi'] <= 0.25, g

def test_grain_measure_counts_what_it_says(tmp_path):
    "The measure itself, on a hand-made notebook: imports-only cells are left out, directives and blank lines not counted."
    nb = {'cells': [{'cell_type': 'code', 'source': ['#| export\n', 'import os\n']},
                    {'cell_type': 'code', 'source': ['#| export\n', 'def f(): pass\n', '\n', 'def g(): pass\n']},
                    {'cell_type': 'code', 'source': ['x = 1\n']},
                    {'cell_type': 'code', 'source': ['#| exports\n', 'A = 1\n', 'class B: pass\n', '# why\n']}]}
    p = tmp_path / '00_x.ipynb'; p.write_text(json.dumps(nb))
    assert list(exported_cells(p)) == [(2, 2), (3, 1)]
    assert grain([p]) == dict(median=2.5, max=3, multi=0.5)

TRACKS = ('start here', 'method', 'data', 'evaluation', 'baselines', 'run layer', 'experiments')

def test_reading_order_names_every_notebook_and_its_track():
    "The reading-order table of the index lists every notebook once, each on a reading track; the method track is 04, 05, 07, 08, 13, 14."
    table = next(src(c) for c in cells(NBS / 'index.ipynb') if src(c).startswith('## Reading order'))
    rows = re.findall(r'^\| `(\w+)` \| ([^|]+?) \|', table, re.M)
    assert sorted(n for n, _ in rows) == sorted(p.stem for p in NBS.glob('*.ipynb') if p.stem != 'index')
    assert {t for _, t in rows} <= set(TRACKS), rows
    assert [n[:2] for n, t in rows if t == 'method'] == ['04', '05', '07', '08', '13', '14']
