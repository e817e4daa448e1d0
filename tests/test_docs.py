"""The documentation cannot go stale silently: generated pages match the code, every relative link resolves, every
`aoe-ep ...` command line parses, every config key named exists, every logged key is documented. Each checker is
also run on a deliberately broken input, so that a checker that finds nothing is itself caught."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from aoe_ep import docsgen
from aoe_ep.cli import build_parser, parse_args

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
CONFIG_SPAN = re.compile(r"(?P<section>model|moe|parallel|data|train)\.(?P<key>[a-z][a-z0-9_]*)(\s*[=:].*)?")
SET_ARG = re.compile(r"--set '?(?P<section>model|moe|parallel|data|train)\.(?P<key>[a-z][a-z0-9_]*)=")


def broken_links(page: Path, text: str) -> list[str]:
    """Relative links (files, and #anchors of this page) that do not resolve."""
    bad = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # http:, https:, mailto:
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest.read_text(encoding="utf-8")):
            bad.append(target)
    return bad


def _anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for heading in re.findall(r"^#+ (.+)$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        out.add(slug)
    return out


def command_lines(text: str) -> list[tuple[str, bool]]:
    """`aoe-ep ...` invocations as (line, whole): lines of fenced blocks are whole commands; inline code spans may
    mention a subcommand with some of its flags. Synopses (`[--ep N]`, `a|b`) are skipped."""
    found = []
    for block in FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("aoe-ep "):
                found.append((line, True))
    for span in CODE_SPAN.findall(FENCE.sub("", text)):
        if span.startswith("aoe-ep ") and not re.search(r"[\[|…]|\.\.\.", span):
            found.append((span.strip(), False))
    return found


def _subparsers(parser) -> dict:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return actions[0].choices if actions else {}


def _mention_ok(words: list[str]) -> bool:
    """The subcommand path exists and every flag written is one of its options."""
    parser = build_parser()
    while words and words[0] in _subparsers(parser):
        parser, words = _subparsers(parser)[words[0]], words[1:]
    if _subparsers(parser) and words:
        return False  # a group such as `bench` followed by no subcommand of it
    options = {o for a in parser._actions for o in a.option_strings}
    return all(w.split("=")[0] in options for w in words if w.startswith("-") and w != "--")


def unparsable_commands(text: str) -> list[str]:
    bad = []
    for line, whole in command_lines(text):
        words = shlex.split(line)[1:]
        if not whole:
            if not _mention_ok(words):
                bad.append(line)
            continue
        words = ["X" if re.fullmatch(r"[A-Z][A-Z_]*", w) else w for w in words]  # placeholders such as RUN_DIR
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                parse_args(words)
        except SystemExit as exit_:
            if exit_.code not in (0, None):
                bad.append(line)
    return bad


def unknown_config_keys(text: str) -> list[str]:
    """Config keys written as such: a code span holding `section.key` (optionally `=value` or `: value`), or the
    argument of `--set` in a command line."""
    keys = docsgen.config_keys()
    written = [m for span in CODE_SPAN.findall(FENCE.sub("", text)) if (m := CONFIG_SPAN.fullmatch(span.strip()))]
    written += [m for block in [text] for m in SET_ARG.finditer(block)]
    return sorted({f"{m['section']}.{m['key']}" for m in written} - set(keys))


@pytest.mark.parametrize("name", sorted(docsgen.PAGES))
def test_generated_pages_are_current(name):
    assert name not in docsgen.stale_pages(), f"docs/{name} is stale: run python -m aoe_ep.docsgen"


def test_stale_page_is_detected(tmp_path):
    (tmp_path / "config.md").write_text(docsgen.render_config() + "| `moe.removed` | int | `1` | | gone |\n")
    (tmp_path / "metrics.md").write_text(docsgen.render_metrics())
    assert docsgen.stale_pages(tmp_path) == ["config.md"]


def test_config_help_names_every_key():
    assert set(docsgen.CONFIG_HELP) == set(docsgen.config_keys())


def test_every_report_figure_is_described():
    from aoe_ep.analysis.report import FIGURES

    assert set(docsgen.REPORT_FIGURES) == {name for name, _ in FIGURES}
    assert "| `worst_layer` |" in docsgen.render_metrics()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_pages_have_no_broken_links(page):
    assert broken_links(page, page.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_command_lines_parse(page):
    assert unparsable_commands(page.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_config_keys_exist(page):
    assert unknown_config_keys(page.read_text(encoding="utf-8")) == []


def test_checkers_catch_broken_input(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "there.md").write_text("# A heading\n")
    text = (
        "[ok](there.md) [ok](there.md#a-heading) [gone](missing.md) [bad anchor](there.md#nope)\n"
        "```bash\naoe-ep train --config tiny\naoe-ep train --no-such-flag\naoe-ep frobnicate\n```\n"
        "Mentions: `aoe-ep eval --json`, `aoe-ep eval --jsn`, `aoe-ep bench layer`, `aoe-ep bench lay`.\n"
        "Set `moe.top_k` or `moe.top_kk`; `train.lr=0.1` is fine, `train.learning_rate=0.1` is not.\n"
    )
    assert broken_links(page, text) == ["missing.md", "there.md#nope"]
    assert unparsable_commands(text) == [
        "aoe-ep train --no-such-flag",
        "aoe-ep frobnicate",
        "aoe-ep eval --jsn",
        "aoe-ep bench lay",
    ]
    assert unknown_config_keys(text) == ["moe.top_kk", "train.learning_rate"]


def test_every_logged_key_is_documented(tmp_path):
    """A short run of the tiny model logs its keys; each is covered by docs/metrics.md."""
    import json

    from aoe_ep.config import load_config
    from aoe_ep.train.trainer import train

    cfg = load_config(
        "tiny",
        [
            "train.max_steps=4",
            "train.warmup_steps=1",
            "train.log_interval=2",
            "train.eval_interval=4",
            "train.save_interval=100",
            "train.device=cpu",
            "train.global_batch_tokens=512",
            "train.micro_batch_size=4",
            "data.seq_len=64",
            "moe.balance=bias",
            f"train.out_dir={tmp_path / 'run'}",
        ],
    )
    train(cfg)
    keys = set()
    for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines():
        keys |= set(json.loads(line))
    assert docsgen.undocumented_metrics(keys) == []
    assert docsgen.undocumented_metrics({"moe/layer00/brand_new"}) == ["moe/layer00/brand_new"]
