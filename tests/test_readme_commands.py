"""Every papermill and `python -m usjepa.pipeline` command in README.md is checked against the code, without training,
so a command in README cannot drift from the parameters, presets and values the code takes.

`papermill nbs/train.ipynb` commands run train.ipynb's own first cells (its parameters cell, papermill's injected cell,
its configuration cell) as papermill would, up to the validated `config`; the data folder and the checkpoint files they
name are taken as present and fitting (recorded, not read). Other notebooks' commands are checked against their
parameters cells, and the experiment grid's `-p preset` against its presets."""
import contextlib, io, json, re, shlex
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / 'README.md'
PLACEHOLDER = 'dummy'                    # what a `…` placeholder in a command stands for

def commands(text, program) -> list:
    "The words of every command in `text` that starts with `program`: in fenced code blocks (`\\` continuations joined, `# comments` cut) and in inline code."
    blocks = re.findall(r'^```[a-z]*\n(.*?)^```', text, re.M | re.S)
    lines = [l for b in blocks for l in re.sub(r'\\\n\s*', ' ', b).splitlines()]
    lines += re.findall(r'`([^`\n]+)`', re.sub(r'^```.*?^```', '', text, flags=re.M | re.S))
    start = ' '.join(program)
    found = [shlex.split(l, comments=True) for l in lines if l.strip() == start or l.strip().startswith(start + ' ')]
    return [[PLACEHOLDER if w == '…' else w for w in words] for words in found]

def papermill_parameters(words) -> tuple:
    "The input notebook and the `-p` / `-r` parameters of a papermill command, each valued as papermill values it."
    from papermill.cli import _resolve_type
    if len(words) < 3: raise ValueError(f"{shlex.join(words)}: papermill needs an input and an output notebook")
    rest, params = words[3:], {}
    while rest:
        opt = rest.pop(0)
        if opt not in ('-p', '-r') or len(rest) < 2:
            raise ValueError(f"{shlex.join(words)}: {opt!r} is not a -p NAME VALUE or -r NAME VALUE pair")
        name, value = rest.pop(0), rest.pop(0)
        params[name] = _resolve_type(value) if opt == '-p' else value
    return words[1], params

def train_config(params):
    "What train.ipynb makes of papermill's `params`: its code cells as papermill runs them, up to the one that builds `config`."
    from papermill.translators import translate_parameters
    cells = [c for c in json.loads((ROOT / 'nbs' / 'train.ipynb').read_text())['cells'] if c['cell_type'] == 'code']
    ns, history = {}, ['']
    for c in cells:
        sources = [''.join(c['source'])]
        if 'parameters' in c['metadata'].get('tags', []) and params:      # papermill's cell comes right after it
            sources.append(translate_parameters('python3', 'python', params, 'Parameters'))
        for src in sources:
            history.append(src); ns['In'] = history                     # the kernel's input history, as IPython keeps it
            exec(compile(src, 'train.ipynb', 'exec'), ns)
        if 'config' in ns: return ns['config']
    raise AssertionError('no cell of train.ipynb builds `config`')

def check_commands(text) -> dict:
    "Check every command of README's `text`; returns, by command line, train.ipynb's and the pipeline's configurations and the other notebooks' parameters."
    import papermill as pm
    from usjepa.grid import PRESETS
    from usjepa.pipeline import main
    checked = {}
    for words in commands(text, ['papermill']):
        nb, params = papermill_parameters(words)
        if nb == 'nbs/train.ipynb': checked[shlex.join(words)] = train_config(params); continue
        names = list(pm.inspect_notebook(str(ROOT / nb)))
        unknown = [n for n in params if n not in names]
        if unknown: raise ValueError(f"{shlex.join(words)}: {unknown} are not parameters of {nb} ({', '.join(names)})")
        if nb == 'nbs/experiments.ipynb' and params.get('preset', 'cpu') not in PRESETS:
            raise ValueError(f"{shlex.join(words)}: preset={params['preset']!r} is not a preset of the grid ({', '.join(PRESETS)})")
        checked[shlex.join(words)] = params
    for words in commands(text, ['python', '-m', 'usjepa.pipeline']):
        with contextlib.redirect_stdout(io.StringIO()): checked[shlex.join(words)] = main(words[3:] + ['--check'])
    return checked

@pytest.fixture
def outside_world(monkeypatch):
    "The data folders and checkpoint files the commands name, as `validate` sees them: present and fitting; each check is recorded."
    import usjepa.config as config
    seen = dict(data_dir=[], init_checkpoint=[])
    monkeypatch.setattr(config, 'find_camus_root', lambda d: seen['data_dir'].append(d) or d)
    monkeypatch.setattr(config, 'check_splits', lambda root: None)
    monkeypatch.setattr(config, 'check_checkpoint', lambda path, enc, pred, partial=False: seen['init_checkpoint'].append((path, enc, pred)))
    monkeypatch.setattr(config, 'load_videomae', lambda path, mae, **kw: seen['init_checkpoint'].append((path, mae, None)))
    return seen

PAPER = 'papermill nbs/train.ipynb out.ipynb -p preset paper -p data_dir /data/CAMUS_public -p init_checkpoint vitl16.pth.tar'

def test_every_readme_command_is_valid(outside_world):
    text = README.read_text(encoding='utf-8')
    checked = check_commands(text)
    train = [k for k in checked if k.startswith('papermill nbs/train.ipynb')]
    assert len(train) == text.count('papermill nbs/train.ipynb') >= 6          # the parser missed none
    assert any(k.startswith('papermill nbs/experiments.ipynb') for k in checked)
    assert any(k.startswith('python -m usjepa.pipeline --preset paper') for k in checked)
    assert PAPER in checked

def test_the_paper_command_is_the_paper_run(outside_world):
    from usjepa.config import validate, paper_config
    c = train_config(papermill_parameters(shlex.split(PAPER))[1])
    assert outside_world['data_dir'] == ['/data/CAMUS_public']
    assert c == validate(paper_config('vitl16.pth.tar', '/data/CAMUS_public'))
    assert (c.lr, c.start_lr, c.warmup_epochs, c.probe_batch_size, c.probe_dim) == (2e-4, 1e-6, 20, 4, 256)
    path, enc, pred = outside_world['init_checkpoint'][0]                     # the model the checkpoint is matched against
    assert (path, tuple(enc.pos_embed.shape), len(enc.blocks), len(pred.predictor_blocks)) == ('vitl16.pth.tar', (1, 1568, 1024), 24, 12)
    cli = [k for k in commands(README.read_text(encoding='utf-8'), ['python', '-m', 'usjepa.pipeline']) if '--preset' in k]
    with contextlib.redirect_stdout(io.StringIO()):
        from usjepa.pipeline import main
        assert [main(w[3:] + ['--check']) for w in cli] == [c]                   # the same run without papermill

def test_the_vjepa2_command_is_the_grids_vjepa2_run(outside_world):
    "README's V-JEPA 2 run is the experiment grid's `paper_vjepa2` base with the paper's method and λ."
    from usjepa.config import RunConfig, validate
    from usjepa.grid import PRESETS
    text = README.read_text(encoding='utf-8')
    [words] = [w for w in commands(text, ['papermill', 'nbs/train.ipynb']) if '-p pos_embed rope' in ' '.join(w)]
    params = papermill_parameters(words)[1]
    want = RunConfig(**{**PRESETS['paper_vjepa2']['base'], 'data_dir': params['data_dir'], 'init_checkpoint': params['init_checkpoint']})
    assert train_config(params) == validate(want)

def test_the_cpu_preset_is_the_parameters_as_given(outside_world):
    "No preset, or `cpu`: the configuration is the parameters cell with papermill's values, as before presets existed."
    from usjepa.config import RunConfig, validate, from_preset
    assert train_config({}) == validate(RunConfig())
    assert train_config(dict(lr=5e-4, seed=2)) == train_config(dict(preset='cpu', lr=5e-4, seed=2)) == validate(RunConfig(lr=5e-4, seed=2))
    paper = train_config(dict(preset='paper', lr=1e-3, from_scratch=True))       # 1e-3 is the CPU default's lr: given, it wins
    assert (paper.lr, paper.warmup_epochs) == (1e-3, 20) and paper == validate(from_preset('paper', lr=1e-3, from_scratch=True))

DRIFTS = [  # (what README says, a drifted version, what the check says about it)
    ('-p lam 0.25      # the main job', '-p lamda 0.25      # the main job', 'lamda: did you mean lam?'),
    ('out.ipynb -p preset paper -p data_dir /data/CAMUS_public -p init_checkpoint vitl16',
     'out.ipynb -p preset papers -p data_dir /data/CAMUS_public -p init_checkpoint vitl16', "preset='papers' is unknown; choose one of ('cpu', 'paper')"),
    ('out.ipynb -p method unet ', 'out.ipynb -p method unets ', "method='unets' is unknown"),
    ('-p predictor_heads 12 -p probe_depth 4', '-p predictor_head 12 -p probe_depth 4', 'predictor_head: did you mean predictor_heads?'),
    ('report.ipynb -p preset cpu -p workers 2 ', 'report.ipynb -p preset cpuu -p workers 2 ', "preset='cpuu' is not a preset of the grid"),
    ('-p preset cpu -p workers 2 ', '-p preset cpu -p worker 2 ', "['worker'] are not parameters of nbs/experiments.ipynb"),
    ('-p vjepa_checkpoint vitl.pt', '-p vjepa_ckpt vitl.pt', "['vjepa_ckpt'] are not parameters of nbs/experiments.ipynb"),
    ('-p seeds 0,1,2', '-p seed 0,1,2', "['seed'] are not parameters of nbs/22_ablation.ipynb"),
    ('usjepa.pipeline --preset paper -p data_dir', 'usjepa.pipeline --preset paper -p data_dri', 'data_dri: did you mean data_dir?'),
]

@pytest.mark.parametrize('said,drifted,msg', DRIFTS)
def test_a_drifted_command_fails(outside_world, said, drifted, msg):
    "The check can fail: each drifted command, alone in an otherwise unchanged README, is refused with a message naming it."
    text = README.read_text(encoding='utf-8')
    assert text.count(said) == 1, said                                        # the drift really changes README's text
    with pytest.raises(ValueError, match=re.escape(msg)): check_commands(text.replace(said, drifted))

def test_commands_are_read_as_a_shell_reads_them():
    text = "```sh\npapermill nbs/train.ipynb o.ipynb -p lam 0.5 \\\n    -p seed 3   # a comment\n```\nand `papermill nbs/x.ipynb o.ipynb -p a …` inline."
    assert commands(text, ['papermill']) == [['papermill', 'nbs/train.ipynb', 'o.ipynb', '-p', 'lam', '0.5', '-p', 'seed', '3'],
                                             ['papermill', 'nbs/x.ipynb', 'o.ipynb', '-p', 'a', PLACEHOLDER]]
    assert papermill_parameters(commands(text, ['papermill'])[0])[1] == dict(lam=0.5, seed=3)
    with pytest.raises(ValueError, match="'-k' is not a -p NAME VALUE"): papermill_parameters(['papermill', 'a', 'b', '-k', 'python3'])
