"""The command lines' message catalogue: every message in both languages, no inline bilingual text, one language shown.

The catalogue is sekisho/common/locale/<lang>/LC_MESSAGES/cli.po (English msgids, Japanese by default);
docs/console.md, "Command-line language", says how the language is chosen and how to add a message.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer

from sekisho.common import i18n

ROOT = Path(__file__).resolve().parent.parent
SEKISHO = Path(sys.executable).parent / "sekisho"
JAPANESE = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff]")
# The grep of issue 12, item 7: Japanese, then " / " and a Latin letter (or an f-string's field), in one string.
BILINGUAL = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff][^\"\n]* / [A-Za-z{]")
SEARCHED = ["agents", "controller", "sekisho", "drivers", "deploy", "protocol"]
# Files allowed to keep `日本語 / English` text, and why.
ALLOWED: dict[str, str] = {
    # Registers and their exports are bilingual by design (docs/registers.md): the CSV/PDF paper forms carry
    # both languages, and the console shows one half of each cell by the reader's language (register_query.half).
    "controller/reports/exports.py": "bilingual export headers by design",
    "controller/reports/registers.py": "register cells, split per language by the console",
    "controller/reports/timelines.py": "timeline cells, split per language by the console",
    "controller/reports/muster.py": "muster cells, split per language by the console",
    "controller/reports/labels.py": "a docstring showing the bilingual label format",
    "controller/reports/filters.py": "register filter errors, split per language by the console",
    "controller/reports/paging.py": "register paging errors, split per language by the console",
    "controller/reports/service.py": "register errors, split per language by the console",
}


def _bilingual_lines() -> list[str]:
    found: list[str] = []
    for top in SEARCHED:
        for path in sorted((ROOT / top).rglob("*.py")):
            if path.is_symlink() or any(part.is_symlink() for part in path.relative_to(ROOT).parents if part.parts):
                continue
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith(("controller/console/", "sekisho/agents/", "sekisho/controller/")):
                continue  # the console has its own catalogue; sekisho/<layer> are links to the folders
            if rel in ALLOWED:
                continue
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if BILINGUAL.search(line):
                    found.append(f"{rel}:{number}: {line.strip()}")
    return found


def test_no_inline_bilingual_strings_outside_the_allow_list() -> None:
    """A `日本語 / English` string in code shows both languages at once: it belongs in the catalogue."""
    assert _bilingual_lines() == []


def test_the_allow_list_names_only_files_that_still_need_it() -> None:
    """An entry whose file no longer has bilingual text is dropped, so the list only shrinks."""
    stale = [
        rel
        for rel in ALLOWED
        if not any(BILINGUAL.search(line) for line in (ROOT / rel).read_text(encoding="utf-8").splitlines())
    ]
    assert stale == []


def test_every_message_used_is_in_both_catalogues() -> None:
    """Each msgid the sources use is in ja and en, translated and not fuzzy."""
    assert i18n.CLI.used_messages(), "the extractor found no message at all"
    assert i18n.CLI.missing_translations() == []


def test_translations_use_the_placeholders_of_their_msgid() -> None:
    """A translation that drops or invents a %(name)s placeholder loses a value or fails at run time."""
    placeholder = re.compile(r"%\((\w+)\)")
    wrong: list[str] = []
    for lang in i18n.LANGUAGES:
        for key, strings in i18n.parse_po(i18n.CLI.path(lang).read_text(encoding="utf-8")).items():
            if key == "":
                continue  # the header
            wanted = set(placeholder.findall(key if isinstance(key, str) else key[0]))
            wrong += [f"{lang}: {key!r} -> {s!r}" for s in strings if set(placeholder.findall(s)) != wanted]
    assert wrong == []


def test_the_check_names_a_message_added_without_translating(tmp_path: Path) -> None:
    """The completeness check fails on a new message until both .po files have it."""
    (tmp_path / "new_cli.py").write_text('from sekisho.common.i18n import _\n_("A brand new message")\n')
    problems = i18n.CLI.missing_translations([tmp_path])
    assert any(p.startswith("ja: missing 'A brand new message'") for p in problems)
    assert any(p.startswith("en: missing 'A brand new message'") for p in problems)


def test_japanese_catalogue_is_japanese_and_english_is_the_msgid() -> None:
    """The Japanese side of a message shows Japanese; the English side is the msgid itself."""
    assert i18n.gettext("ja", "Media register and loans.") == "電子媒体台帳と貸出記録"
    assert i18n.gettext("en", "Media register and loans.") == "Media register and loans."
    assert i18n.gettext("ja", "backed up to %(output)s", output="x.tar.gz") == "バックアップしました: x.tar.gz"


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, "ja"),
        ({"LANG": "C.UTF-8"}, "ja"),
        ({"LANG": "en_GB.UTF-8"}, "en"),
        ({"LANG": "ja_JP.UTF-8", "LC_MESSAGES": "en_US.UTF-8"}, "en"),
        ({"LC_ALL": "ja_JP.UTF-8", "LANG": "en_US.UTF-8"}, "ja"),
        ({"SEKISHO_LANG": "ja", "LC_ALL": "en_US.UTF-8"}, "ja"),
        ({"SEKISHO_LANG": "en", "LANG": "ja_JP.UTF-8"}, "en"),
        ({"SEKISHO_LANG": "fr"}, "ja"),
        ({"SEKISHO_LANG": "", "LANG": "en_US"}, "en"),
    ],
)
def test_language_precedence(environ: dict[str, str], expected: str) -> None:
    """SEKISHO_LANG, then LC_ALL, LC_MESSAGES, LANG: the first one set decides; anything not en… is Japanese."""
    assert i18n.lang_from_env(environ) == expected


def test_po_parser_reads_continued_strings_escapes_plurals_and_skips_fuzzy() -> None:
    """The run-time parser (no Babel on agent hosts) reads what Babel writes."""
    text = (
        'msgid ""\nmsgstr ""\n"Plural-Forms: nplurals=1; plural=0;\\n"\n\n'
        'msgid "a \\"quoted\\" "\n"line"\nmsgstr "引用"\n"された行"\n\n'
        '#, fuzzy\nmsgid "unsure"\nmsgstr "不確か"\n\n'
        'msgid "%(num)s door"\nmsgid_plural "%(num)s doors"\nmsgstr[0] "扉%(num)s件"\n'
    )
    entries = i18n.parse_po(text)
    assert entries['a "quoted" line'] == ["引用された行"]
    assert "unsure" not in entries
    assert entries[("%(num)s door", "%(num)s doors")] == ["扉%(num)s件"]


# Options Typer adds itself; their help is Typer's own text and cannot be given a catalogue message.
TYPER_OWN_OPTIONS = {"install_completion", "show_completion"}


def _helps(command: Any, path: str) -> Iterator[tuple[str, str]]:
    yield path, (command.help or "").strip()
    for param in command.params:
        if param.name not in TYPER_OWN_OPTIONS:
            yield f"{path} {param.name}", (getattr(param, "help", None) or "").strip()
    for name, sub in getattr(command, "commands", {}).items():
        yield from _helps(sub, f"{path} {name}")


def _translated_pattern(translation: str) -> re.Pattern[str]:
    parts = re.split(r"%\(\w+\)s", translation)
    return re.compile(".+".join(re.escape(part) for part in parts))


def test_every_command_and_option_help_comes_from_the_catalogue() -> None:
    """`--help` of sekisho and sekisho-agent: each command's and option's help is a catalogue message shown in
    the process language (Japanese here), so a command added with an English docstring only fails."""
    from sekisho.cli import app
    from sekisho.entry import agent_cli

    assert i18n.process_lang() == "ja"
    translations = [
        s
        for key, strings in i18n.parse_po(i18n.CLI.path("ja").read_text(encoding="utf-8")).items()
        if key
        for s in strings
    ]
    exact = set(translations)
    patterns = [_translated_pattern(t) for t in translations if "%(" in t]
    wrong = []
    for root, name in ((app, "sekisho"), (agent_cli(), "sekisho-agent")):
        for path, text in _helps(typer.main.get_command(root), name):
            if not text:
                wrong.append(f"{path}: no help")
            elif text not in exact and not any(p.fullmatch(text) for p in patterns):
                wrong.append(f"{path}: not from the catalogue: {text!r}")
    assert wrong == []
    # The walk reaches the sub-commands of both programs, not only the top level.
    helps = dict(_helps(typer.main.get_command(app), "sekisho"))
    assert helps["sekisho doors keys"] == "鍵貸出管理簿を表示します。"
    assert "sekisho-agent enrol force" in dict(_helps(typer.main.get_command(agent_cli()), "sekisho-agent"))


@pytest.mark.parametrize("lang", ["ja", "en"])
def test_agent_help_is_in_the_chosen_language(lang: str, tmp_path: Path) -> None:
    """`sekisho-agent run --help` (help from a docstring before) shows one language."""
    env = {k: v for k, v in os.environ.items() if k not in i18n.LANG_VARIABLES}
    env["SEKISHO_LANG"] = lang
    out = subprocess.run(
        [str(SEKISHO.with_name("sekisho-agent")), "run", "--help"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    if lang == "en":
        assert "Run the agent until SIGINT or SIGTERM." in out.stdout
        assert not JAPANESE.search(out.stdout), out.stdout
    else:
        assert "SIGINT または SIGTERM までエージェントを動かします。" in out.stdout
        assert "Run the agent until" not in out.stdout


def _run(lang: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in i18n.LANG_VARIABLES}
    env["SEKISHO_LANG"] = lang
    return subprocess.run(
        [str(SEKISHO), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.parametrize("lang", ["ja", "en"])
def test_help_is_in_the_chosen_language(lang: str, tmp_path: Path) -> None:
    """`sekisho media --help` shows its help text in one language."""
    out = _run(lang, "media", "--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    if lang == "en":
        assert "Media register and loans." in out.stdout
        assert "List the loan register." in out.stdout
        assert not JAPANESE.search(out.stdout), out.stdout
    else:
        assert "電子媒体台帳と貸出記録" in out.stdout
        assert "貸出記録を一覧表示します。" in out.stdout  # a command's help, not only the group's
        assert "Media register and loans." not in out.stdout


@pytest.mark.parametrize("lang", ["ja", "en"])
def test_an_error_is_in_the_chosen_language(lang: str, tmp_path: Path) -> None:
    """A command that fails says why in the chosen language only."""
    config = tmp_path / "controller.toml"
    config.write_text("this is [not toml\n", encoding="utf-8")
    out = _run(lang, "controller", "backup", "-c", str(config), "-o", str(tmp_path / "b.tar.gz"), cwd=tmp_path)
    assert out.returncode == 2
    if lang == "en":
        assert "invalid controller config" in out.stderr
        assert "設定を読めません" not in out.stderr
    else:
        assert "設定を読めません" in out.stderr
        assert "invalid controller config" not in out.stderr
