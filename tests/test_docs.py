"""The documentation's code examples run, and what it says about the code holds.

* Every ```python block of README.md and docs/*.md runs, each in a fresh namespace.
* Every ``python -m vae_jax.main ...`` command in a ```bash block resolves: its config file
  exists, its ``:arg`` is accepted, every ``--config.x=y`` override applies,
  ``config.validate`` accepts the result, and its other flags are flags of ``vae_jax.main``
  with values they accept. A ``python experiments/<x>.py`` command names a script that exists
  and defines its flags. Other commands are skipped only from a list, each with its reason.
* The README's seconds-long offline command runs end to end.
* Links resolve, the module tables list every module bottom floor first with its imports, and
  the dependency table names what ``pyproject.toml`` declares.
"""

import ast
import pathlib
import re
import shlex
import subprocess
import sys
import tomllib

import pytest
from absl import flags
from conftest import process_env
from ml_collections import config_flags

from vae_jax import config as config_lib

# ml_collections loads config files with importlib's deprecated load_module().
pytestmark = pytest.mark.filterwarnings(
  "ignore:the load_module\\(\\) method is deprecated:DeprecationWarning"
)

REPO = pathlib.Path(__file__).parents[1]
README = REPO / "README.md"
DESIGN = REPO / "docs" / "design.md"
DOCS = [README, *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\S*)\s*$")


def _blocks(path: pathlib.Path) -> list[tuple[str, int, str]]:
  """``(language, line of the opening fence, text)`` of each fenced block of ``path``."""
  lines = path.read_text().splitlines()
  blocks, i = [], 0
  while i < len(lines):
    match = FENCE.match(lines[i])
    if not match:
      i += 1
      continue
    end = i + 1
    while end < len(lines) and lines[end].strip() != "```":
      end += 1
    blocks.append((match.group(1), i + 1, "\n".join(lines[i + 1 : end])))
    i = end + 1
  return blocks


def _prose(path: pathlib.Path) -> str:
  """``path``'s text without its fenced blocks (whose ``#`` comments are not headings)."""
  lines, out, inside = path.read_text().splitlines(), [], False
  for line in lines:
    if FENCE.match(line) or (inside and line.strip() == "```"):
      inside = not inside
      continue
    if not inside:
      out.append(line)
  return "\n".join(out)


PYTHON_BLOCKS = [
  (f"{p.relative_to(REPO)}:{line}", text)
  for p in DOCS
  for lang, line, text in _blocks(p)
  if lang == "python"
]


# --------------------------------------------------------------------------
# Shell commands.

# Commands in the docs that are not this project's own, each with why it is not run here.
SKIPPED = {
  "pip": "installs packages; CI (.ci/run) runs the README's install in a fresh environment",
  "python -m venv": "creates the virtual environment that the install goes into",
  "python -m pytest": "runs this test suite",
  ".": "activates the virtual environment (a shell builtin)",
  "source": "activates the virtual environment (a shell builtin)",
  "sudo": "installs a system package (apt-get), which needs root",
  "bash": "runs a shell script: experiments/accelerator_wheels.sh downloads wheels from PyPI",
  "apt-get": "installs a system package, which needs root",
  "tensorboard": "a viewer for the event files, not part of this project",
  "export": "sets an environment variable for the commands that follow",
  "cd": "changes directory",
  "ruff": "the linter and formatter, run by CI's lint step",
  "tfds": "TFDS's command line: it prepares catalog datasets with TensorFlow, not installed",
}
_SEPARATORS = {"&&", "||", ";", "|"}
_ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def _logical_lines(text: str) -> list[tuple[int, str]]:
  """``(offset of its first line, text)`` of the block's lines, continuations joined."""
  out, pending, first = [], "", None
  for offset, line in enumerate(text.splitlines()):
    first = offset if first is None else first
    if line.rstrip().endswith("\\"):
      pending += line.rstrip()[:-1] + " "
      continue
    out.append((first, pending + line))
    pending, first = "", None
  if pending:
    out.append((first, pending))
  return out


def _classify(tokens: list[str]) -> tuple[str, str]:
  """``("main" | "experiment" | "skip" | "unknown", detail)`` of one simple command."""
  head = tokens[0]
  if head in ("python", "python3"):
    rest = tokens[1:]
    if rest[:2] == ["-m", "vae_jax.main"]:
      return "main", ""
    if rest[:2] == ["-m", "venv"]:
      return "skip", SKIPPED["python -m venv"]
    if rest[:2] == ["-m", "pytest"]:
      return "skip", SKIPPED["python -m pytest"]
    if rest and rest[0].startswith("experiments/") and rest[0].endswith(".py"):
      return "experiment", rest[0]
    return "unknown", " ".join(tokens)
  if head in SKIPPED:
    return "skip", SKIPPED[head]
  return "unknown", " ".join(tokens)


def _commands() -> list[tuple[str, str, list[str], str]]:
  """``(where, kind, tokens, detail)`` of every simple command in the docs' bash blocks."""
  out = []
  for path in DOCS:
    for lang, line, text in _blocks(path):
      if lang != "bash":
        continue
      for offset, logical in _logical_lines(text):
        tokens = shlex.split(logical, comments=True)
        simple: list[list[str]] = [[]]
        for token in tokens:
          if token in _SEPARATORS:
            simple.append([])
          else:
            simple[-1].append(token)
        for command in simple:
          while command and _ENV_ASSIGNMENT.match(command[0]):
            command = command[1:]  # VAR=value before a command: its environment.
          if command:
            kind, detail = _classify(command)
            where = f"{path.relative_to(REPO)}:{line + 1 + offset}"
            out.append((where, kind, command, detail))
  return out


COMMANDS = _commands()
MAIN_COMMANDS = [(w, t) for w, kind, t, _ in COMMANDS if kind == "main"]
EXPERIMENT_COMMANDS = [(w, t) for w, kind, t, _ in COMMANDS if kind == "experiment"]


def _load_config(spec: str | None, overrides: list[str]):
  """The config ``--config=spec`` plus ``overrides`` gives, parsed as absl parses it.
  Without ``spec`` (a workdir's recorded config stands in), the overrides apply to
  ``config.base_config()``, so each must at least name a field of the right type."""
  flag_values = flags.FlagValues()
  if spec is None:
    argv = ["docs", *overrides]
    config_flags.DEFINE_config_dict(
      "config", config_lib.base_config(), flag_values=flag_values, lock_config=True
    )
  else:
    path, _, arg = spec.partition(":")
    assert (REPO / path).is_file(), f"no config file {path}"
    resolved = f"{REPO / path}:{arg}" if arg else str(REPO / path)
    argv = ["docs", f"--config={resolved}", *overrides]
    config_flags.DEFINE_config_file(
      "config", None, flag_values=flag_values, lock_config=True, sys_argv=argv
    )
  flag_values(argv)
  return flag_values.config


def _split_config_args(args: list[str]) -> tuple[str | None, list[str], list[str]]:
  specs = [a.removeprefix("--config=") for a in args if a.startswith("--config=")]
  assert len(specs) <= 1, f"more than one --config: {specs}"
  overrides = [a for a in args if a.startswith("--config.")]
  others = [a for a in args if not a.startswith(("--config=", "--config."))]
  return (specs[0] if specs else None), overrides, others


def _flag_name_value(arg: str) -> tuple[str, str | None]:
  assert arg.startswith("--"), f"not a flag: {arg!r}"
  name, eq, value = arg[2:].partition("=")
  return name, (value if eq else None)


@pytest.mark.parametrize("tokens", [t for _, t in MAIN_COMMANDS], ids=[w for w, _ in MAIN_COMMANDS])
def test_main_command_resolves(tokens):
  from vae_jax import main  # Defines the command's flags on absl's global FLAGS.

  spec, overrides, others = _split_config_args(tokens[3:])
  config = _load_config(spec, overrides)
  if spec is not None:
    config_lib.validate(config)
  else:  # The workdir's record stands in for --config: only to resume or evaluate it.
    assert any(a.startswith("--workdir=") for a in others), "no --config and no --workdir"
  given = set()
  for arg in others:
    name, value = _flag_name_value(arg)
    if value is None and name not in main.FLAGS and name.startswith("no"):
      name = name[2:]  # --noflag: a boolean set to False.
    assert name in main.FLAGS, f"--{name} is not a flag of vae_jax.main"
    flag = main.FLAGS[name]
    given.add(name)
    if value is None:
      assert flag.boolean, f"--{name} needs a value"
    elif "$" not in value:  # A shell variable (--process_id=$RANK): only the name is checked.
      flag.parser.parse(value)  # Raises for a value the flag refuses (e.g. --mode=eval).
  assert "workdir" in given, "the command has no --workdir"


@pytest.mark.parametrize(
  "tokens", [t for _, t in EXPERIMENT_COMMANDS], ids=[w for w, _ in EXPERIMENT_COMMANDS]
)
def test_experiment_command_resolves(tokens):
  script = REPO / tokens[1]
  assert script.is_file(), f"{tokens[1]} does not exist"
  source = script.read_text()
  defined = set(re.findall(r"DEFINE_\w+\(\s*\"(\w+)\"", source))
  required = set(
    re.findall(r"\"(\w+)\"", " ".join(re.findall(r"mark_flags?_as_required\((.*?)\)", source)))
  )
  spec, overrides, others = _split_config_args(tokens[2:])
  if spec is not None or overrides:
    assert "config" in defined, f"{tokens[1]} has no --config flag"
  if spec is not None:
    config_lib.validate(_load_config(spec, overrides))
  booleans = set(re.findall(r"DEFINE_bool\(\s*\"(\w+)\"", source))

  def name(arg: str) -> str:  # --noflag: the boolean flag set to False.
    n, value = _flag_name_value(arg)
    return n[2:] if value is None and n.startswith("no") and n[2:] in booleans else n

  given = {name(a) for a in others} | ({"config"} if spec else set())
  assert given - defined == set(), f"{tokens[1]} defines no flag {sorted(given - defined)}"
  assert required <= given, f"{tokens[1]} requires {sorted(required - given)}"


def test_every_command_is_checked_or_skipped_for_a_reason():
  unknown = [(w, " ".join(t)) for w, kind, t, _ in COMMANDS if kind == "unknown"]
  assert not unknown, f"commands neither checked nor in SKIPPED (with a reason): {unknown}"
  # The docs hold many commands of the project; a parser that found none would pass vacuously.
  assert len(MAIN_COMMANDS) >= 20 and len(EXPERIMENT_COMMANDS) >= 3


@pytest.mark.parametrize("code", [c for _, c in PYTHON_BLOCKS], ids=[w for w, _ in PYTHON_BLOCKS])
def test_python_example_runs(code):
  exec(compile(code, "<docs example>", "exec"), {"__name__": "docs_example"})  # noqa: S102


def test_there_are_python_examples():
  assert len(PYTHON_BLOCKS) >= 2


# --------------------------------------------------------------------------
# The README.

README_FIRST_BLOCK = """\
# Install and train the MNIST VAE (downloads MNIST on first use):
python3 -m venv .venv && . .venv/bin/activate && pip install -e . && python -m vae_jax.main \
--config=configs/mnist.py --workdir=runs/mnist

# Run the tests (offline; tiny real-MNIST fixture shipped in tests/fixtures):
pip install -e ".[test]" && python -m pytest -q"""


def test_readme_starts_with_the_commands_ci_runs():
  lang, _, text = _blocks(README)[0]
  assert lang == "bash" and text == README_FIRST_BLOCK


def test_readme_smoke_command_runs_end_to_end(tmp_path):
  (tokens,) = [
    t
    for w, t in MAIN_COMMANDS
    if w.startswith("README.md")
    and "--config=configs/mnist.py:smoke" in t
    and "--config.idx_dir=tests/fixtures/mnist_tiny" in t
  ]
  workdir, data_dir = tmp_path / "smoke", tmp_path / "tfds"
  args = [
    f"--workdir={workdir}"
    if a.startswith("--workdir=")
    else f"--config.data_dir={data_dir}"
    if a.startswith("--config.data_dir=")
    else a
    for a in tokens[1:]
  ]
  assert f"--workdir={workdir}" in args and f"--config.data_dir={data_dir}" in args
  result = subprocess.run(
    [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
    env=process_env(),
  )  # fmt: skip
  assert result.returncode == 0, result.stderr[-3000:]
  assert (workdir / "config.json").is_file()
  assert (workdir / "metrics.jsonl").read_text().strip()
  assert [p for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]


# --------------------------------------------------------------------------
# Links, tables and claims about the code.

_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_relative_links_and_images_resolve():
  checked = 0
  for path in DOCS:
    for target in _LINK.findall(_prose(path)):
      if re.match(r"^[a-z]+://", target):
        continue  # External: not fetched by an offline test.
      file, _, anchor = target.partition("#")
      resolved = (path.parent / file).resolve() if file else path
      assert resolved.exists(), f"{path.name}: {target} does not exist"
      if anchor:
        headings = re.findall(r"^#+ (.*)$", _prose(resolved), re.M)
        assert anchor in {_slug(h) for h in headings}, f"{path.name}: no heading #{anchor}"
      checked += 1
  assert checked >= 15


def _module_imports() -> dict[str, set[str]]:
  """``{module: the vae_jax modules it imports}`` for every module of vae_jax."""
  out = {}
  for path in sorted((REPO / "vae_jax").glob("*.py")):
    if path.stem == "__init__":
      continue
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and node.module == "vae_jax":
        deps |= {a.name for a in node.names}
      elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vae_jax."):
        deps.add(node.module.split(".")[1])
      elif isinstance(node, ast.Import):
        deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("vae_jax.")}
    out[path.stem] = deps
  return out


@pytest.mark.parametrize(
  "path, row", [(README, r"^\| `vae_jax/(\w+)\.py` \|"), (DESIGN, r"^\| `(\w+)\.py` \|")],
  ids=["README", "design"],
)  # fmt: skip
def test_module_tables_name_every_module(path, row):
  listed = re.findall(row, path.read_text(), re.M)
  assert sorted(listed) == sorted(_module_imports()), "the table and vae_jax/ differ"


def test_imports_go_one_way_with_none_inside_functions():
  """The modules' imports form no cycle, and no function imports vae_jax (which is how a
  cycle is dodged)."""
  imports = _module_imports()
  done: set[str] = set()

  def visit(module: str, path: tuple[str, ...]) -> None:
    assert module not in path, f"import cycle: {' -> '.join((*path, module))}"
    if module in done:
      return
    for dep in imports[module]:
      visit(dep, (*path, module))
    done.add(module)

  for module in imports:
    visit(module, ())
  local = []
  for path in sorted((REPO / "vae_jax").glob("*.py")):
    for fn in ast.walk(ast.parse(path.read_text())):
      if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
        local += [
          f"{path.name}:{n.lineno}"
          for n in ast.walk(fn)
          if isinstance(n, ast.Import | ast.ImportFrom) and "vae_jax" in ast.unparse(n)
        ]
  assert not local, f"vae_jax imported inside functions: {local}"


def test_config_imports_nothing_of_vae_jax_but_errors():
  """Config files (configs/*.py) import only ml_collections and vae_jax.config, so the
  config module stays on the bottom floor."""
  assert _module_imports()["config"] <= {"errors"}
  for path in (REPO / "configs").glob("*.py"):
    assert _third_party_imports(path) <= {"ml_collections"}, path.name
    vae_jax_modules = {
      n.module for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ImportFrom)
    }
    assert vae_jax_modules <= {"vae_jax.config", "ml_collections"}, path.name


def test_readme_config_table_lists_every_config():
  listed = set(re.findall(r"^\| `(\w+\.py)` \|", README.read_text(), re.M))
  configs = {p.name for p in (REPO / "configs").glob("*.py")}
  assert configs <= listed, f"configs missing from the README's table: {configs - listed}"


def test_readme_config_arguments_are_accepted():
  """Each argument in the config table's last column builds a valid config."""
  rows = re.findall(r"^\| `(\w+\.py)` \|[^|]*\|([^|]*)\|$", README.read_text(), re.M)
  assert len(rows) >= 8
  for name, column in rows:
    args = re.findall(r"`([^`]+)`", column)
    mains = [a for a in args if not a.startswith(",")]
    modifiers = [mains[0] + a for a in args if a.startswith(",")]
    assert mains, f"{name}: no arguments listed"
    for arg in mains + modifiers:
      config_lib.validate(_load_config(f"configs/{name}:{arg}", []))


def test_results_hold_the_beta_sweep_table_the_report_wrote():
  table = (REPO / "docs" / "beta_sweep_table.md").read_text().strip()
  assert table in (REPO / "docs" / "results.md").read_text()


def test_tests_the_docs_name_exist():
  """``test_x.py::test_y`` (and ``::test_z`` after it, in the same file) names a real test."""
  named = 0
  for path in DOCS:
    current = None
    for match in re.finditer(r"(test_\w+\.py)?::(test_\w+)", path.read_text()):
      current = match.group(1) or current
      assert current, f"{path.name}: ::{match.group(2)} without a test file before it"
      source = (REPO / "tests" / current).read_text()
      assert f"def {match.group(2)}(" in source, f"{path.name}: no {current}::{match.group(2)}"
      named += 1
  assert named >= 25


def _third_party_imports(path: pathlib.Path) -> set[str]:
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names |= {a.name.split(".")[0] for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names.add(node.module.split(".")[0])
  return names - set(sys.stdlib_module_names) - {"vae_jax", "__future__"}


def test_dependencies_stay_in_the_modules_the_docs_name():
  users: dict[str, set[str]] = {}
  for path in (REPO / "vae_jax").glob("*.py"):
    for package in _third_party_imports(path):
      users.setdefault(package, set()).add(path.name)
  assert users["flax"] == {"networks.py"}
  assert users["orbax"] == {"checkpointing.py"}
  assert users["matplotlib"] == {"figures.py"}
  assert users["sklearn"] == {"disentanglement.py", "builders.py"}  # builders: the photographs.
  assert users["grain"] == {"input_pipeline.py"}
  assert users["tensorboardX"] == {"writers.py"}
  assert "chex" not in users  # Test assertions only.
  assert _third_party_imports(REPO / "vae_jax" / "losses.py") == {"jax"}


def _normalized(requirement: str) -> str:
  return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def test_design_dependency_table_names_what_pyproject_declares():
  project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
  runtime = {_normalized(r) for r in project["dependencies"]}
  extras = {
    g: {_normalized(r) for r in reqs} for g, reqs in project["optional-dependencies"].items()
  }
  section = DESIGN.read_text().split("## Dependencies", 1)[1]
  rows = re.findall(r"^\| `([\w.\-]+)`(?: \((\w+)\))? \|", section, re.M)
  table_runtime = {_normalized(name) for name, group in rows if not group}
  assert table_runtime == runtime, (
    f"only in docs/design.md: {sorted(table_runtime - runtime)}; "
    f"only in pyproject.toml's dependencies: {sorted(runtime - table_runtime)}"
  )
  for name, group in rows:
    if group:
      assert _normalized(name) in extras.get(group, set()), f"{name} is not in the {group} extra"
  tagged = {_normalized(name) for name, group in rows if group}
  assert set().union(*extras.values()) <= tagged | runtime


def _call_name(node: ast.expr) -> str:
  return ast.unparse(node)


def _calls_process_env(node: ast.expr) -> bool:
  return any(
    isinstance(n, ast.Call) and _call_name(n.func) == "process_env" for n in ast.walk(node)
  )


def test_every_test_subprocess_gets_process_env():
  """Tests that start a process pass ``env=process_env(...)`` (or a variable holding one)."""
  starters = {"subprocess.run", "subprocess.Popen", "subprocess.call", "subprocess.check_call",
              "subprocess.check_output"}  # fmt: skip
  found = 0
  for path in sorted((REPO / "tests").glob("*.py")):
    tree = ast.parse(path.read_text())
    # Variables assigned from process_env(...), or from an expression built on it.
    from_process_env = {
      t.id
      for node in ast.walk(tree)
      if isinstance(node, ast.Assign) and _calls_process_env(node.value)
      for t in node.targets
      if isinstance(t, ast.Name)
    }
    for node in ast.walk(tree):
      if not (isinstance(node, ast.Call) and _call_name(node.func) in starters):
        continue
      found += 1
      env = [k.value for k in node.keywords if k.arg == "env"]
      where = f"{path.name}:{node.lineno}"
      assert env, f"{where} starts a process without env=process_env(...)"
      value = env[0]
      assert (isinstance(value, ast.Call) and _call_name(value.func) == "process_env") or (
        isinstance(value, ast.Name) and value.id in from_process_env
      ), f"{where}: env={ast.unparse(value)} is not process_env(...)"
  assert found >= 10
