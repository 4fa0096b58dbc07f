"""README.md and docs/ agree with the code: their links lead to files that exist, and every option they show in a
`sonocad VERB ...` command is one of that verb's options (`--help` lists the same parser)."""
import re
from pathlib import Path

import pytest

from sonocad.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def code_spans(text: str) -> list[str]:
    """Each line of the fenced code blocks (continuation lines joined) and each inline code span."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
    lines = [line for b in blocks for line in b.replace("\\\n", " ").splitlines()]
    return lines + re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))


def verb_options() -> dict[str, set[str]]:
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    return {verb: {o for a in p._actions for o in a.option_strings} for verb, p in sub.choices.items()}


def shown_options(text: str, verbs) -> list[tuple[str, str, str]]:
    """(verb, option, the command) for every option written after `sonocad VERB` in a code span of `text`."""
    found = []
    for span in code_spans(text):
        for m in re.finditer(r"\bsonocad (\w+)((?:\s+\S+)*)", span.split(" #")[0]):
            if m.group(1) in verbs:
                found += [(m.group(1), o, m.group(0)) for o in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", m.group(2))]
    return found


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_links_lead_to_files_that_exist(doc):
    targets = [t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", doc.read_text())
               if not re.match(r"[a-z]+:|#", t)]
    assert targets or doc.name != "README.md"
    missing = [t for t in targets if not (doc.parent / t).exists()]
    assert not missing, f"{doc.name} links to missing files: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_commands_use_options_that_exist(doc):
    options = verb_options()
    unknown = [f"{verb} {option} (in `{command}`)" for verb, option, command in shown_options(doc.read_text(), options)
               if option not in options[verb] | {"--help"}]
    assert not unknown, f"{doc.name}: options no command has: {unknown}"


def test_the_check_sees_commands_and_a_wrong_option():
    options = verb_options()
    text = ("Run `sonocad train DATA --out RUN --img-size 224`:\n"
            "```\nsonocad adapt bus-base scans/ \\\n  --out r --fold 3\n```\n")
    assert {(v, o) for v, o, _ in shown_options(text, options)} == {("train", "--out"), ("train", "--img-size"),
                                                                     ("adapt", "--out"), ("adapt", "--fold")}
    assert "--fold" not in options["adapt"] and "--folds" in options["adapt"]
    assert sum(len(shown_options(d.read_text(), options)) for d in DOCS) > 100      # the docs show many
