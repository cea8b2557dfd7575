"""README.md is made from nbs/index.ipynb; this test keeps them in sync.

Regenerate with `python tests/test_readme.py --write` after editing the index notebook."""
import json, re, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def render_readme(nb_path=ROOT/'nbs'/'index.ipynb') -> str:
    "Markdown cells as they are (links to notebooks made relative to the root), visible code cells as python blocks, `#| hide` cells left out."
    cells = json.loads(Path(nb_path).read_text(encoding='utf-8'))['cells']
    parts = []
    for c in cells:
        src = ''.join(c['source']).strip()
        if not src: continue
        if c['cell_type'] == 'markdown': parts.append(re.sub(r'\]\((?![a-z]+:|/|#)([^)]+\.ipynb)\)', r'](nbs/\1)', src))
        elif c['cell_type'] == 'code' and not src.startswith('#| hide'): parts.append(f'```python\n{src}\n```')
    return '\n\n'.join(parts) + '\n'

def test_readme_in_sync_with_index():
    assert (ROOT/'README.md').read_text(encoding='utf-8') == render_readme(), \
        "README.md is out of date with nbs/index.ipynb: run `python tests/test_readme.py --write`"

def test_readme_quick_start_commands():
    text = (ROOT/'README.md').read_text(encoding='utf-8')
    ci = (ROOT/'.ci'/'run').read_text(encoding='utf-8')
    for cmd in ['pip install -e ".[dev]"', 'papermill nbs/train.ipynb out.ipynb -p lam 0.25', 'nbdev_test && pytest -q tests']:
        assert cmd in text, f'README quick start lacks: {cmd}'
    for cmd in ['pip install -e ".[dev]"', 'nbdev_test && pytest -q tests']:
        assert cmd in ci, f'.ci/run does not run: {cmd}'

def test_readme_links_resolve():
    "README's relative links (the guided tour first) name files of the repository."
    links = re.findall(r'\]\((?![a-z]+:|#)([^)#]+)', (ROOT/'README.md').read_text(encoding='utf-8'))
    assert links and links[0] == 'nbs/tutorial.ipynb', links[:3]
    missing = [t for t in links if not (ROOT/t).exists()]
    assert not missing, missing

if __name__ == '__main__' and '--write' in sys.argv:
    (ROOT/'README.md').write_text(render_readme(), encoding='utf-8')
