"""The documentation holds: relative links and their anchors resolve (GitHub's anchor rules),
every repository path and ``make`` target named in a command exists, the flags of documented
``tools/`` commands exist in the scripts' parsers, and neither the docs nor the comments and
docstrings of the code carry development-diary wording."""
import ast
import functools
import io
import re
import shlex
import subprocess
import tokenize
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / 'README.md', *(ROOT / 'docs').rglob('*.md')])
CODE_DIRS = ('mmvit_plugins', 'tools', 'configs')
# Wrapper scripts pass their options on to these tools.
FORWARDS = {'tools/dist_train.sh': 'tools/train.py', 'tools/slurm_train.sh': 'tools/train.py',
            'tools/dist_test.sh': 'tools/test.py', 'tools/slurm_test.sh': 'tools/test.py'}
# How a development diary reads: who ran what when, not what the project is.
DIARY = [
    (r'(?<!onnxruntime )(?<!inference )\bsessions?\b', 'session'),  # not onnxruntime's
    (r'\bissues? #?\d+', 'issue number'),
    (r'\blent\b', 'lent'),
    (r'\bhelpers?\b', 'helper'),
    (r'\brounds? \d+', 'round number'),
    (r'(?<![\w-])(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)(?:[0-9a-f]{7,12}|[0-9a-f]{40})(?![\w-])',
     'commit hash'),
]
FENCE = re.compile(r'^\s*(```|~~~)')
HEADING = re.compile(r'^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$')
LINK = re.compile(r'!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^()\s>]*(?:\([^()\s]*\)[^()\s>]*)*)>?'
                  r'(?:\s+"[^"]*")?\s*\)')
REF_DEF = re.compile(r'^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+"[^"]*")?\s*$', re.M)
HTML_LINK = re.compile(r'\b(?:href|src)="([^"]+)"')
HTML_ANCHOR = re.compile(r'<a\s+(?:name|id)="([^"]+)"')
CODE_SPAN = re.compile(r'(`+)(.+?)\1', re.S)
# Inline code starting with one of these is a command (other spans may name files of other
# projects, e.g. mmdeploy's own tools/deploy.py).
PROGRAMS = {'python', 'python3', 'bash', 'sh', 'make', 'pytest', 'torchrun', 'mim', 'pip',
            'ruff', 'ls', 'cat', 'source', 'cd'}
SHELL_LANGS = {'', 'bash', 'sh', 'shell', 'console', 'shell-session', 'text'}


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def split_markdown(text: str) -> Tuple[str, List[Tuple[str, str]]]:
    """The prose (fenced blocks blanked, line numbers kept) and the fenced blocks
    ``(language, body)``."""
    prose, blocks, fence, lang, body = [], [], None, '', []
    for line in text.splitlines():
        match = FENCE.match(line)
        if fence is None and match:
            fence, lang, body = match.group(1), line.strip()[3:].strip().lower(), []
            prose.append('')
        elif fence is not None and line.strip().startswith(fence):
            blocks.append((lang, '\n'.join(body)))
            fence = None
            prose.append('')
        elif fence is not None:
            body.append(line)
            prose.append('')
        else:
            prose.append(line)
    return '\n'.join(prose), blocks


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its rendered text, lower case, without punctuation
    (letters, digits, ``_`` and ``-`` stay), spaces turned into hyphens."""
    text = re.sub(r'!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\([^)]*\)', r'\1', heading)
    text = re.sub(r'<[^>]+>', '', text).replace('`', '').replace('*', '')
    return re.sub(r'[^\w\- ]', '', text.strip().lower()).replace(' ', '-')


def anchors(text: str) -> Set[str]:
    """Every anchor a markdown file defines: headings (duplicates numbered ``-1``, ``-2`` as
    GitHub numbers them) and HTML ``<a name|id=...>``."""
    prose, _ = split_markdown(text)
    found, counts = set(HTML_ANCHOR.findall(prose)), {}
    for line in prose.splitlines():
        match = HEADING.match(line)
        if match:
            slug = github_slug(match.group(2))
            n = counts.get(slug, 0)
            counts[slug] = n + 1
            found.add(slug if n == 0 else f'{slug}-{n}')
    return found


def link_targets(text: str) -> Iterator[str]:
    """The targets of inline links and images, reference definitions and HTML links, outside
    code."""
    prose, _ = split_markdown(text)
    prose = CODE_SPAN.sub('', prose)
    yield from LINK.findall(prose)
    yield from REF_DEF.findall(prose)
    yield from HTML_LINK.findall(prose)


def broken_links(doc: Path, text: str) -> List[str]:
    """Relative links of ``doc`` whose file or heading anchor does not exist."""
    problems = []
    for target in link_targets(text):
        if not target or re.match(r'^[a-z][a-z0-9+.-]*:', target, re.I):  # http:, mailto:, ...
            continue
        path_part, _, anchor = target.partition('#')
        path_part = unquote(path_part)
        if not path_part:
            if unquote(anchor) not in anchors(text):
                problems.append(f'{target}: no heading with anchor #{anchor} in this page')
            continue
        if path_part.startswith('/'):
            resolved = (ROOT / path_part.lstrip('/')).resolve()
        else:
            resolved = (doc.parent / path_part).resolve()
        if ROOT != resolved and ROOT not in resolved.parents:
            problems.append(f'{target}: points outside the repository')
            continue
        if not resolved.exists():
            problems.append(f'{target}: no such file {rel(resolved)}')
            continue
        if anchor and resolved.suffix == '.md':
            if unquote(anchor) not in anchors(resolved.read_text()):
                problems.append(f'{target}: no heading with anchor #{anchor} in {rel(resolved)}')
    return problems


def tracked_top_level() -> Set[str]:
    """The top-level files and folders of the repository (what a command may name in it)."""
    try:
        files = subprocess.run(['git', 'ls-files'], cwd=ROOT, capture_output=True, text=True,
                               check=True, timeout=60).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        files = [p.name for p in ROOT.iterdir()
                 if p.name not in ('.git', '.venv', 'data', 'work_dirs', 'checkpoints')]
    return {f.split('/')[0] for f in files}


TOP_LEVEL = tracked_top_level()


def commands(text: str) -> Iterator[str]:
    """Shell commands of a markdown file: the lines of shell code blocks (continuations joined,
    prompts and comments dropped) and the inline code spans that start with a program."""
    prose, blocks = split_markdown(text)
    for lang, body in blocks:
        if lang not in SHELL_LANGS:
            continue
        for line in re.sub(r'\\\n', ' ', body).splitlines():
            line = re.sub(r'(^|\s)#.*$', '', re.sub(r'^\s*[$>] ', '', line)).strip()
            if line:
                yield line
    for _, span in CODE_SPAN.findall(prose):
        span = span.replace('\n', ' ').strip()
        program = re.sub(r'^(\w+=\S*\s+)*', '', span).split(' ')[0]
        if program.split('/')[-1] in PROGRAMS:  # a command, not a name in prose
            yield span


def words(command: str) -> List[str]:
    try:
        return shlex.split(command, comments=False)
    except ValueError:
        return command.split()


def is_placeholder(piece: str) -> bool:
    """``CONFIG``, ``work_dirs/.../x.pth``, ``<dir>``, ``$VAR``: stands for the user's own."""
    return (any(mark in piece for mark in ('...', '<', '>', '$', '{', '}', '[', ']', '|'))
            or any(re.fullmatch(r'[A-Z][A-Z0-9_]*', part) for part in piece.split('/')))


def repo_paths(word: str) -> Iterator[str]:
    """The repository paths a command word names (``key=value`` and ``a,b`` pieces too)."""
    for piece in re.split(r'[=,]', word):
        piece = piece.strip('\'"()').rstrip('.;:').split('#')[0]
        piece = piece[2:] if piece.startswith('./') else piece
        if not piece or is_placeholder(piece) or piece.split('/')[0] not in TOP_LEVEL:
            continue
        if '/' in piece or piece in TOP_LEVEL:
            yield piece


@functools.cache
def git_ignored(path: str) -> bool:
    """Whether git ignores ``path`` (as a file or a folder): a build product or user data."""
    try:
        return any(subprocess.run(['git', 'check-ignore', '-q', name], cwd=ROOT,
                                  timeout=60).returncode == 0 for name in (path, f'{path}/'))
    except OSError:
        return False


def makefile_targets() -> Set[str]:
    return set(re.findall(r'^([\w.-]+):', (ROOT / 'Makefile').read_text(), re.M))


def _added_options(node: ast.AST) -> Set[str]:
    """The option strings of the ``add_argument`` calls under ``node``."""
    return {arg.value for call in ast.walk(node) if isinstance(call, ast.Call)
            and getattr(call.func, 'attr', '') == 'add_argument' for arg in call.args
            if isinstance(arg, ast.Constant) and str(arg.value).startswith('-')}


def _library_option_adders() -> Dict[str, Set[str]]:
    """Functions of mmvit_plugins/ and of the helper modules of tools/ (files that are not
    scripts, e.g. the converters' shared ``add_converter_arguments``) that add options to a
    parser, by name."""
    adders = {}
    helpers = [path for path in (ROOT / 'tools').rglob('*.py')
               if "__name__ == '__main__'" not in path.read_text()]
    for path in [*(ROOT / 'mmvit_plugins').rglob('*.py'), *helpers]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and _added_options(node):
                adders[node.name] = _added_options(node)
    return adders


LIBRARY_ADDERS = _library_option_adders()


def tool_options(script: str) -> Set[str]:
    """The option strings a script's argparse parser defines, read from its source and the
    library functions it calls to add options."""
    tree = ast.parse((ROOT / script).read_text())
    options = _added_options(tree)
    for call in ast.walk(tree):
        if isinstance(call, ast.Call):
            name = getattr(call.func, 'id', getattr(call.func, 'attr', ''))
            options |= LIBRARY_ADDERS.get(name, set())
    return options


def command_problems(command: str) -> List[str]:
    """Missing repository paths, ``make`` targets and tool flags of one command."""
    problems, targets = [], makefile_targets()
    for part in re.split(r'\s*(?:&&|\|\||;|\|)\s*', command):
        tokens = words(part)
        script = None
        for i, token in enumerate(tokens):
            for path in repo_paths(token):
                path, *tests = path.split('::')  # a pytest node id: file::test
                matches = list(ROOT.glob(path)) if any(c in path for c in '*?') else [ROOT / path]
                if not any(p.exists() for p in matches):
                    if not git_ignored(path):  # build products (mmvit_plugins/.mim) may be absent
                        problems.append(f'`{command}`: {path} does not exist')
                    continue
                source = matches[0].read_text() if tests and matches[0].is_file() else ''
                problems += [f'`{command}`: no test {name} in {path}' for name in tests
                             if not re.search(rf'^\s*(def|class) {re.escape(name)}\b', source,
                                              re.M)]
                if script is None and re.fullmatch(r'tools/[\w/.-]+\.(py|sh)', path):
                    script = path
                    flags = [t for t in tokens[i + 1:] if t.startswith('-')]
                    problems += flag_problems(command, script, flags)
            if token == 'make':
                problems += [f'`{command}`: no make target {t!r} in Makefile'
                             for t in tokens[i + 1:] if not t.startswith('-') and '=' not in t
                             and not is_placeholder(t) and t not in targets]
    return problems


def flag_problems(command: str, script: str, flags: List[str]) -> List[str]:
    tool = FORWARDS.get(script, script)
    known = tool_options(tool) if tool.endswith('.py') else set()
    problems = []
    for flag in flags:
        flag = flag.strip('[]').split('=')[0].rstrip('.,;:)')
        if flag.startswith('--') and len(flag) > 2 and flag not in known:
            problems.append(f'`{command}`: {tool} has no option {flag}')
    return problems


def code_text(path: Path) -> Iterator[Tuple[int, str]]:
    """``(line, text)`` of the comments and docstrings of a Python, shell or YAML file."""
    source = path.read_text()
    if path.suffix != '.py':
        for n, line in enumerate(source.splitlines(), 1):
            if line.lstrip().startswith('#') and not line.startswith('#!'):
                yield n, line
        return
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            yield token.start[0], token.string
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                yield node.body[0].lineno, doc


def diary_problems(text: str) -> List[str]:
    return [f'{name}: {match.group(0)!r}' for pattern, name in DIARY
            for match in re.finditer(pattern, text, re.I if name != 'commit hash' else 0)]


def code_files() -> List[Path]:
    return sorted(p for d in CODE_DIRS for p in (ROOT / d).rglob('*')
                  if p.suffix in ('.py', '.sh', '.yml') and p.is_file()
                  and '.mim' not in p.parts and '__pycache__' not in p.parts)


# -- the checks on the repository ----------------------------------------------------------------
@pytest.mark.parametrize('doc', DOCS, ids=rel)
def test_relative_links_and_anchors_resolve(doc):
    problems = broken_links(doc, doc.read_text())
    assert not problems, '\n'.join(problems)


@pytest.mark.parametrize('doc', DOCS, ids=rel)
def test_commands_name_existing_paths_targets_and_flags(doc):
    problems = [p for command in commands(doc.read_text()) for p in command_problems(command)]
    assert not problems, '\n'.join(dict.fromkeys(problems))


@pytest.mark.parametrize('doc', DOCS, ids=rel)
def test_docs_hold_no_diary_wording(doc):
    problems = diary_problems(doc.read_text())
    assert not problems, '\n'.join(problems)


def test_code_comments_and_docstrings_hold_no_diary_wording():
    problems = [f'{rel(path)}:{line}: {problem}' for path in code_files()
                for line, text in code_text(path) for problem in diary_problems(text)]
    assert not problems, '\n'.join(problems)


def test_docs_pages_the_code_names_exist():
    """``docs/<page>.md#anchor`` in messages of the code (e.g. the tools' pre-flight check)."""
    problems = [f'{rel(path)}: {problem}' for path in code_files()
                for target in re.findall(r'\bdocs/[\w/.-]+\.md(?:#[\w-]+)?', path.read_text())
                for problem in broken_links(ROOT / 'index.md', f'[x]({target})')]
    assert not problems, '\n'.join(problems)


def test_license_file_is_the_declared_license():
    text = (ROOT / 'LICENSE').read_text()
    assert text.split()[:4] == ['Apache', 'License', 'Version', '2.0,']
    assert 'APPENDIX: How to apply the Apache License to your work.' in text
    setup_cfg = (ROOT / 'setup.cfg').read_text()
    assert re.search(r'^license = Apache-2.0$', setup_cfg, re.M)
    assert re.search(r'^license_files = LICENSE$', setup_cfg, re.M)


# -- the checker itself, on made-up pages ---------------------------------------------------------
def test_github_slugs():
    page = ('# Pretrained weights\n## `init_cfg` and *options*\n## A - B: c.d\n'
            '## Pretrained weights\n```\n# not a heading\n```\n<a name="custom"></a>\n'
            '## [Link](x.md) text\n## Ünïcode 3.10\n')
    assert anchors(page) == {'pretrained-weights', 'init_cfg-and-options', 'a---b-cd',
                             'pretrained-weights-1', 'custom', 'link-text', 'ünïcode-310'}


def test_broken_links_are_found():
    doc = ROOT / 'docs' / 'page.md'
    text = ('[ok](install.md) [ok](install.md#' + sorted(anchors(
        (ROOT / 'docs' / 'install.md').read_text()))[0] + ') [web](https://example.org/x#y) '
            '[self](#here) [self2](#there)\n# Here\n[gone](missing.md) '
            '[bad](install.md#no-such-anchor) '
            '[out](../../x.md) `[code](missing2.md)`\n```\n[block](missing3.md)\n```\n'
            '[ref]: ./nothing.md\n<img src="../no.png">')
    problems = broken_links(doc, text)
    assert len(problems) == 6, problems
    for name in ('#there', 'missing.md', '#no-such-anchor', 'outside', 'nothing.md', 'no.png'):
        assert any(name in p for p in problems), (name, problems)


def test_command_checks_find_missing_paths_targets_and_flags():
    assert command_problems('python tools/train.py CONFIG --work-dir DIR [--amp] --resume') == []
    assert command_problems('bash tools/dist_train.sh CONFIG 8 --auto-scale-lr') == []
    assert command_problems('make demo && make demo-det') == []
    assert command_problems('python tools/misc/image_demo.py IMG.jpg work_dirs/.../x.pth') == []
    assert command_problems('PYTHON=python3.11 make env  ') == []
    assert command_problems('pytest tests/test_docs.py::test_github_slugs') == []
    assert command_problems('ls mmvit_plugins/.mim/configs') == []  # made by the install
    cases = {
        'python tools/train.py configs/nope.py': 'configs/nope.py does not exist',
        'python tools/trian.py CONFIG': 'tools/trian.py does not exist',
        'python tools/train.py CONFIG --work_dir x': 'tools/train.py has no option --work_dir',
        'bash tools/dist_test.sh CONFIG CKPT 2 --show': 'tools/test.py has no option --show',
        'make demo-seg': "no make target 'demo-seg'",
        'ls configs/*_nothing.py': 'configs/*_nothing.py does not exist',
        'python tools/test.py C K --cfg-options x=configs/gone.py': 'configs/gone.py does not',
        'pytest tests/test_docs.py::test_nothing_here': 'no test test_nothing_here in tests/',
    }
    for command, problem in cases.items():
        found = command_problems(command)
        assert len(found) == 1 and problem in found[0], (command, found)


def test_commands_come_from_shell_blocks_and_code_spans():
    page = ('Run `make demo` first, `PYTHON=python3.12 bash tools/setup_env.sh` and '
            "`.venv/bin/python tools/x.py`, not mmdeploy's own `tools/deploy.py`.\n```bash\n"
            'python tools/train.py X \\\n    --amp  # note\n$ make test\n```\n'
            '```python\nimport os\n```\n')
    assert list(commands(page)) == ['python tools/train.py X      --amp', 'make test',
                                    'make demo', 'PYTHON=python3.12 bash tools/setup_env.sh',
                                    '.venv/bin/python tools/x.py']


def test_diary_wording_is_found():
    text = ('As measured in session 12 (issue 21, round 3), on the lent GPU, commit 4eafea4; '
            'the helper ran it.')
    assert [p.split(':')[0] for p in diary_problems(text)] == [
        'session', 'issue number', 'lent', 'helper', 'round number', 'commit hash']
    clean = ('An onnxruntime InferenceSession, an onnxruntime session; silent; the 2 rounds; '
             'a sha256 of 64 hex digits '
             + 'ab12' * 16 + '; 1e-4; deadbeef; 0x1f2e3d4c.')
    assert diary_problems(clean) == []
