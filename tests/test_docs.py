"""The README and docs/ against the code: links and anchors resolve, every `paw ...` command
line names commands and flags the CLI has, every dotted Python name (`paw_mlx.function`,
`interp.lora.ADAPTER_INPUT`) exists, every `PAW_*` switch is read, and the README's Python
example runs. A renamed flag or module then fails here, not in a user's terminal."""

from __future__ import annotations

import ast
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer

from apps.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: shell tokens after which a command line's own arguments end
SHELL_BREAKS = {"|", "||", "&&", ";", "&", "<"}
PACKAGES = ("paw_mlx", "interp", "exporter", "apps")
DOTTED = re.compile(r"(?<![\w./])((?:" + "|".join(PACKAGES) + r")(?:\.[A-Za-z_]\w*)+)")


def doc_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def github_anchors(path: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces
    as hyphens, a repeated heading suffixed -1, -2, ..."""
    anchors: set[str] = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        heading = re.match(r"#{1,6} (.*)", line)
        if fenced or not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
        candidate, n = slug, 0
        while candidate in anchors:
            n += 1
            candidate = f"{slug}-{n}"
        anchors.add(candidate)
    return anchors


def code_spans(text: str) -> Iterator[str]:
    """Each line of a fenced block and each inline `code` span outside them."""
    fenced = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif fenced:
            yield line
        else:
            yield from re.findall(r"`([^`\n]+)`", line)


def paw_command_lines(text: str) -> Iterator[tuple[str, list[str]]]:
    """(the span, its tokens from `paw` on) for each `paw ...` command in the code of a page."""
    for span in code_spans(text):
        line = re.split(r"\s#\s", span)[0]  # a shell comment
        try:
            tokens = shlex.split(line)
        except ValueError:  # an unclosed quote in prose-like code: words are enough
            tokens = line.split()
        for i, token in enumerate(tokens):
            if token == "paw" or token.endswith("/bin/paw"):
                yield span, tokens[i + 1:]


def test_every_relative_link_and_anchor_resolves():
    broken = []
    for page in DOCS:
        for link in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", link):
                continue
            path, _, anchor = link.partition("#")
            target = (page.parent / path).resolve() if path else page
            if not target.exists():
                broken.append(f"{doc_id(page)}: {link} (no such file)")
            elif anchor and target.suffix == ".md" and anchor not in github_anchors(target):
                broken.append(f"{doc_id(page)}: {link} (no such heading)")
    assert not broken, broken


def test_every_paw_command_in_the_docs_has_its_flags():
    root = typer.main.get_command(app)
    checked, wrong = 0, []
    for page in DOCS:
        for span, tokens in paw_command_lines(page.read_text(encoding="utf-8")):
            command, words = root, ["paw"]
            while hasattr(command, "commands") and tokens and tokens[0] in command.commands:
                command = command.commands[tokens[0]]
                words.append(tokens.pop(0))
            if hasattr(command, "commands"):  # `paw` or `paw export` alone, or prose after it
                if len(words) > 1 and tokens and re.fullmatch(r"[a-z][a-z-]+", tokens[0]):
                    wrong.append(f"{doc_id(page)}: no command {' '.join(words)} {tokens[0]}: {span}")
                continue
            flags = {"--help", "-h"}
            for param in command.params:
                flags.update(param.opts, getattr(param, "secondary_opts", None) or [])
            for token in tokens:
                if token in SHELL_BREAKS or token.startswith(">") or token.startswith("2>"):
                    break
                if re.fullmatch(r"--?[A-Za-z][\w-]*(=.*)?", token):
                    checked += 1
                    if token.split("=")[0] not in flags:
                        wrong.append(f"{doc_id(page)}: {' '.join(words)} has no {token.split('=')[0]}: {span}")
    assert checked > 100, checked  # the pages do show flags
    assert not wrong, wrong


def module_file(parts: list[str]) -> Path | None:
    base = ROOT.joinpath(*parts)
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def top_level_names(body: list[ast.stmt]) -> dict[str, ast.AST | None]:
    """Names a module or class body defines (functions, classes, assignments, imports)."""
    names: dict[str, ast.AST | None] = {}
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names[node.name] = node
        elif isinstance(node, ast.Assign):
            names.update((t.id, None) for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = None
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update(((alias.asname or alias.name).split(".")[0], None) for alias in node.names)
    return names


def resolves(dotted: str) -> bool:
    """Whether a dotted name is a module of this checkout, or a name defined in one (a
    class's attributes included), read from the source without importing it."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        path = module_file(parts[:cut])
        if path is None:
            continue
        rest = parts[cut:]
        if rest and rest[0] in ("py", "md", "json"):  # a file name, not an attribute
            return False
        names = top_level_names(ast.parse(path.read_text(encoding="utf-8")).body)
        for i, name in enumerate(rest):
            if name not in names:
                return False
            node = names[name]
            if i + 1 < len(rest):
                if not isinstance(node, ast.ClassDef):
                    return True  # an attribute of a value: as far as the source tells
                names = top_level_names(node.body)
        return True
    return False


@pytest.mark.parametrize("page", DOCS, ids=doc_id)
def test_every_dotted_python_name_exists(page):
    named = set(DOTTED.findall(page.read_text(encoding="utf-8")))
    missing = sorted(name for name in named if not resolves(name))
    assert not missing, f"{doc_id(page)} names what the code does not have: {missing}"


def test_the_readme_python_example_runs(tiny_program, capsys):
    """The README's first Python block, on the tiny program in place of SmolLM2."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"^### Python\n.*?^```python\n(.*?)^```", readme, re.S | re.M).group(1)
    assert '"smollm2"' in block
    scope: dict = {}
    exec(block.replace('"smollm2"', repr(str(tiny_program))), scope)  # noqa: S102 - our own README
    assert scope["logits"].shape[:2] == (1, len(scope["ids"]))
    assert capsys.readouterr().out.strip()


def test_every_paw_environment_variable_in_the_docs_is_read_by_the_code():
    named = {name for page in DOCS for name in re.findall(r"\bPAW_[A-Z0-9_]+", page.read_text(encoding="utf-8"))}
    code = "\n".join(path.read_text(encoding="utf-8") for folder in (*PACKAGES, "tests", "scripts")
                     for path in (ROOT / folder).rglob("*.py") if path.name != "test_docs.py")
    assert len(named) > 5, named
    assert not sorted(name for name in named if not re.search(rf"\b{name}\b", code))
