"The viewers in a real kernel: a static figure where no widget frontend runs (papermill), a widget under a Jupyter server."
import base64, json, os, subprocess, sys
import pytest

CELL = ("import numpy as np\nfrom usjepa.viz import masking_viewer\n"
        "masking_viewer(np.random.default_rng(0).integers(0, 255, (4, 32, 32), dtype=np.uint8), patch=16)")

def run_papermill(tmp_path, env):
    nbformat = pytest.importorskip('nbformat'); pytest.importorskip('papermill')
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(CELL)])
    nb.metadata['kernelspec'] = dict(name='python3', display_name='python3', language='python')
    src, out = tmp_path / 'in.ipynb', tmp_path / 'out.ipynb'
    nbformat.write(nb, src)
    subprocess.run([sys.executable, '-m', 'papermill', str(src), str(out), '-k', 'python3', '--no-progress-bar'],
                   check=True, env=env, capture_output=True, timeout=180)   # a run takes ~10 s; a hung one fails, not hangs CI
    return json.loads(out.read_text())

def output_kinds(nb): return {k for o in nb['cells'][0]['outputs'] for k in o.get('data', {})}

def kernel_env(**extra):
    "The environment of a notebook kernel: matplotlib's inline backend (CI exports MPLBACKEND=Agg for scripts)."
    return {**{k: v for k, v in os.environ.items() if k not in ('JPY_SESSION_NAME', 'MPLBACKEND')}, **extra}

def test_papermill_keeps_a_static_figure(tmp_path):
    kinds = output_kinds(run_papermill(tmp_path, kernel_env()))
    assert kinds & {'image/png', 'image/jpeg'} and 'application/vnd.jupyter.widget-view+json' not in kinds, kinds

def test_a_jupyter_server_kernel_gets_the_widget(tmp_path):
    nb = run_papermill(tmp_path, kernel_env(JPY_SESSION_NAME=str(tmp_path / 'in.ipynb')))   # as jupyter_server sets it
    assert 'application/vnd.jupyter.widget-view+json' in output_kinds(nb), output_kinds(nb)
    state = nb['metadata']['widgets']['application/vnd.jupyter.widget-state+json']['state'].values()
    images = [m for m in state if m['model_name'] == 'ImageModel']      # the saved notebook keeps the picture itself
    assert len(images) == 1 and base64.b64decode(images[0]['buffers'][0]['data'])[:4] == b'\x89PNG', images
