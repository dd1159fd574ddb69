"""The docs: every flag documented, only files that exist named, and the test command CI runs.

``python tests/test_docs.py`` rewrites the generated flag tables of docs/flags.md.
"""

import re
import sys
from fnmatch import fnmatch
from pathlib import Path
from typing import Iterator

from swamla.train_config import flag_table, flags_markdown

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
FLAGS_DOC = ROOT / "docs" / "flags.md"
BEGIN, END = "<!-- generated: begin -->\n", "<!-- generated: end -->\n"

# A name in backticks is checked as a repository path when it starts with one of these.
TOP_DIRS = ("swamla", "swamla_jax", "swamla_torch", "tests", "benchmarks", "configs", "scripts",
            "docs", "parity_tests", ".ci")
PACKAGES = ("swamla", "swamla_jax", "swamla_torch")
FENCE = re.compile(r"^(```|~~~)[^\n]*\n(.*?)^\1[ \t]*$", re.M | re.S)
INLINE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
DOTTED = re.compile(r"^(?:%s)(?:\.\w+)*$" % "|".join(PACKAGES))


def checked_docs() -> list[Path]:
    """The documents whose links and named paths must all exist."""
    return [ROOT / "README.md", ROOT / "BENCHMARKS.md", ROOT / "SPEC.md",
            *sorted((ROOT / "docs").glob("*.md"))]


def _ignored(rel: Path) -> bool:
    """Whether .gitignore ignores ``rel`` (anchored and unanchored name patterns)."""
    for line in (ROOT / ".gitignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith(("#", "!")):
            continue
        anchored, pattern = pattern.startswith("/"), pattern.strip("/")
        parts = rel.parts[:1] if anchored else rel.parts
        if any(fnmatch(part, pattern) for part in parts):
            return True
    return False


def _slugs(text: str) -> Iterator[str]:
    """GitHub's anchors for the headings of a markdown text."""
    seen: dict[str, int] = {}
    for title in HEADING.findall(FENCE.sub("", text)):
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title).replace("`", "")
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        yield slug if n == 0 else f"{slug}-{n}"


def _links(text: str) -> list[str]:
    """The targets of the markdown links outside code."""
    return LINK.findall(INLINE.sub("code", FENCE.sub("", text)))


def _check_link(target: str, doc: Path, text: str) -> str | None:
    """A link's file exists and is not ignored; its #anchor is a heading of that file."""
    if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # http:, https:, mailto:
        return None
    path, _, anchor = target.partition("#")
    if not path:
        return None if anchor in set(_slugs(text)) else f"link {target!r}: no such heading"
    dest = (doc.parent / path).resolve()
    try:
        rel = dest.relative_to(ROOT)
    except ValueError:
        return f"link {target!r} leaves the repository"
    if not dest.exists():
        return f"link {target!r}: {rel} does not exist"
    if _ignored(rel):
        return f"link {target!r}: {rel} is ignored by .gitignore"
    if anchor and dest.suffix == ".md" and anchor not in set(_slugs(dest.read_text())):
        return f"link {target!r}: {rel} has no heading #{anchor}"
    return None


def _check_name(token: str) -> str | None:
    """A backticked token that names a repository path, or a module of the packages."""
    token = re.sub(r"::.*$", "", token.strip())  # pytest node ids
    token = re.sub(r":\d+(-\d+)?$", "", token).rstrip(".,:;")  # line numbers
    token = token.removeprefix("./")
    if not token or any(c in token for c in "<>{}$~") or "..." in token:
        return None  # a placeholder
    if DOTTED.match(token) and "/" not in token:
        return _check_module(token)
    if "/" not in token or token.split("/")[0] not in TOP_DIRS:
        return None
    if _ignored(Path(token)):
        return None
    if "*" in token or "?" in token:
        return None if list(ROOT.glob(token)) else f"`{token}` matches no file"
    return None if (ROOT / token).exists() else f"`{token}` does not exist"


def _check_module(name: str) -> str | None:
    """``pkg.module[.attribute]``: the module file exists and mentions the attribute."""
    parts, path, source = name.split("."), ROOT, None
    for i, part in enumerate(parts):
        if (path / part / "__init__.py").exists():
            path = path / part
            source = path / "__init__.py"
        elif (path / f"{part}.py").exists():
            source = path / f"{part}.py"
            rest = parts[i + 1:]
            break
        else:
            rest = parts[i:]
            break
    else:
        return None
    if not rest or source is None:
        return None
    if not re.search(rf"\b{re.escape(rest[0])}\b", source.read_text()):
        return f"`{name}`: no module or name {rest[0]!r} in {source.relative_to(ROOT)}"
    return None


def missing_references(text: str, doc: Path) -> list[str]:
    """Links and backticked repository paths of a markdown text that do not exist."""
    code = [m.group(2) for m in FENCE.finditer(text)] + INLINE.findall(FENCE.sub("", text))
    problems = [_check_link(target, doc, text) for target in _links(text)]
    problems += [_check_name(token) for span in code
                 for token in re.split(r"[\s=,;()\[\]'\"]+", span)]
    return [p for p in problems if p]


def test_docs_name_only_files_that_exist():
    problems = [f"{doc.relative_to(ROOT)}: {p}" for doc in checked_docs()
                for p in missing_references(doc.read_text(), doc)]
    for doc in sorted((ROOT / "benchmarks" / "history").glob("*.md")):  # verbatim: links only
        text = doc.read_text()
        problems += [f"{doc.relative_to(ROOT)}: {p}" for p in
                     (_check_link(target, doc, text) for target in _links(text)) if p]
    assert not problems, "\n".join(problems)


def test_the_reference_check_reports_what_is_missing():
    doc = ROOT / "docs" / "example.md"
    text = """# Title

[ok](../README.md) [ok](#title) [web](https://example.com) [bad](missing.md)
[bad anchor](../BENCHMARKS.md#no-such-heading) [ignored](../out/run.json)
`swamla/plan.py:12`, `tests/test_docs.py::test_x`, `configs/*.json`, `out/run/x.json`,
`<DIR>/x.py`, `swamla/no_such_module.py`, `benchmarks/none_*.json`, `swamla.plan.resolve_plan`,
`swamla.plan.no_such_name`, `swamla_jax.no_such_module.f`, `model.py`

```bash
python -m swamla.data.prepare --out shards/x && python -m swamla.no_such_cli
python scripts/no_such_script.py --config configs/small.json
```
"""
    problems = missing_references(text, doc)
    expected = ["missing.md", "#no-such-heading", "out/run.json", "swamla/no_such_module.py",
                "benchmarks/none_*.json", "swamla.plan.no_such_name",
                "swamla_jax.no_such_module.f", "swamla.no_such_cli", "scripts/no_such_script.py"]
    for name in expected:
        assert sum(name in p for p in problems) == 1, (name, problems)
    assert len(problems) == len(expected), problems


def test_every_flag_is_documented():
    text = FLAGS_DOC.read_text()
    missing = [f"--{name}" for names in flag_table().values() for name in names
               if f"`--{name}`" not in text]
    assert not missing, f"docs/flags.md lacks flags {missing}: run python tests/test_docs.py"


def test_flag_tables_are_the_generated_ones():
    text = FLAGS_DOC.read_text()
    assert BEGIN in text and END in text
    block = text.split(BEGIN, 1)[1].split(END, 1)[0]
    assert block == flags_markdown().rstrip("\n") + "\n", \
        "docs/flags.md's flag tables are stale: run python tests/test_docs.py"


def test_seed_flags_are_documented():
    text = FLAGS_DOC.read_text()
    for flag in ("--size", "--batch_size", "--block_size", "--dropout", "--swa_layers_per_cycle",
                 "--mla_layers_per_cycle", "--swa_window", "--swa_sink_size", "--mla_q_lora_rank",
                 "--mla_kv_lora_rank", "--mla_qk_nope_head_dim", "--mla_qk_rope_head_dim",
                 "--mla_v_head_dim", "--max_iters", "--learning_rate", "--min_lr",
                 "--weight_decay", "--beta1", "--beta2", "--warmup_iters", "--grad_clip",
                 "--gradient_accumulation_steps", "--gradient_checkpointing", "--optimizer_type",
                 "--use_fp8", "--tokenizer_name", "--num_workers", "--output_dir",
                 "--log_interval", "--eval_interval", "--save_interval", "--wandb_project",
                 "--wandb_run_name", "--compile"):
        assert f"`{flag}`" in text, flag


def test_ci_runs_the_readme_test_command():
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.startswith("python3 -m venv .venv")]
    assert len(ci) == 1 and ci[0] in README.splitlines(), "the README's test command is not CI's"
    assert 'pip install torch==2.13.0 -e ".[all]" && ' in ci[0]
    assert ci[0].endswith(" && python -m pytest -q")


def write_flag_tables() -> None:
    """Replace the generated block of docs/flags.md with ``flags_markdown()``."""
    head, rest = FLAGS_DOC.read_text().split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    FLAGS_DOC.write_text(head + BEGIN + flags_markdown().rstrip("\n") + "\n" + END + tail)


if __name__ == "__main__":
    write_flag_tables()
    sys.exit(0)
