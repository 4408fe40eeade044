"""Message catalogues for every layer: English msgids, Japanese shown by default, read from .po files at run time.

The .po files are the only form kept: they are parsed and compiled in memory when first used (with the
standard library alone, because agent hosts install no Babel), so there is no compile step and no .mo
file to forget. A fuzzy or empty entry falls back to the English msgid. Babel is needed only to extract
the messages the code uses and check both catalogues (tests/test_cli_i18n.py), which a checkout has.

The command lines and the services share one catalogue, `locale/<lang>/LC_MESSAGES/cli.po` next to this
file; the console keeps its own (controller/console/i18n.py) on the same machinery. A command line shows
one language, chosen once per process by `lang_from_env`: SEKISHO_LANG, then LC_ALL, LC_MESSAGES, LANG
(the first one set decides); a value starting with "en" means English, anything else Japanese.
"""

from __future__ import annotations

import ast
import gettext as _gettext
import io
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Final, Literal, TypeGuard

Lang = Literal["ja", "en"]
LANGUAGES: Final[tuple[Lang, ...]] = ("ja", "en")
DEFAULT_LANG: Final[Lang] = "ja"
# The first of these that is set (and not empty) picks the language; POSIX's order after our own variable.
LANG_VARIABLES: Final = ("SEKISHO_LANG", "LC_ALL", "LC_MESSAGES", "LANG")

COMMON_DIR: Final = Path(__file__).resolve().parent
LOCALE_DIR: Final = COMMON_DIR / "locale"
DOMAIN: Final = "cli"
# Where the command lines' and services' messages live (folders of the checkout; sekisho/<name> are links).
# The console is left out: its pages have their own catalogue.
SOURCE_ROOTS: Final = (
    *(COMMON_DIR.parent.parent / name for name in ("agents", "controller", "deploy", "drivers", "protocol")),
    COMMON_DIR.parent,
)
# The names the extractor looks for, and which argument holds the message.
KEYWORDS: Final[dict[str, Any]] = {"_": None, "N_": None, "M_": None, "ngettext": (1, 2), "gettext": (2,)}


def is_lang(value: object) -> TypeGuard[Lang]:
    """Tell whether a value is one of the supported languages."""
    return value in LANGUAGES


def as_lang(value: object) -> Lang:
    """Return the value if it is a supported language, else the default (Japanese)."""
    return value if is_lang(value) else DEFAULT_LANG


def lang_from_env(environ: Mapping[str, str] | None = None) -> Lang:
    """Return the language the environment asks for: the first of LANG_VARIABLES set; en… is English."""
    env = os.environ if environ is None else environ
    for name in LANG_VARIABLES:
        value = env.get(name, "")
        if value:
            return "en" if value.lower().startswith("en") else "ja"
    return DEFAULT_LANG


@cache
def process_lang() -> Lang:
    """Return this process's language, read from the environment once (Typer help texts are built at import)."""
    return lang_from_env()


class CatalogueError(ValueError):
    """A .po file that cannot be read, with the file and line."""


def _unquote(text: str, where: str) -> str:
    if not (len(text) >= 2 and text[0] == text[-1] == '"'):
        raise CatalogueError(f"{where}: expected a quoted string, got {text!r}")
    try:
        value = ast.literal_eval(text)
    except (SyntaxError, ValueError) as err:
        raise CatalogueError(f"{where}: bad string {text!r}") from err
    if not isinstance(value, str):
        raise CatalogueError(f"{where}: bad string {text!r}")
    return value


def parse_po(text: str, source: str = "<po>") -> dict[str | tuple[str, str], list[str]]:
    """Parse .po text into {msgid or (msgid, plural): [msgstr…]}; fuzzy and obsolete entries are left out."""
    entries: dict[str | tuple[str, str], list[str]] = {}
    fields: dict[str, str] = {}
    current: str | None = None
    fuzzy = False

    def flush() -> None:
        nonlocal fuzzy
        if "msgid" in fields and not fuzzy:
            strings = [fields[k] for k in sorted(k for k in fields if k.startswith("msgstr"))]
            key: str | tuple[str, str] = fields["msgid"]
            if "msgid_plural" in fields:
                key = (fields["msgid"], fields["msgid_plural"])
            entries[key] = strings
        fields.clear()
        fuzzy = False

    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        where = f"{source}:{number}"
        if not line:
            continue
        if line.startswith("#"):
            if current is not None and current.startswith("msgstr"):
                flush()
                current = None
            if line.startswith("#,") and "fuzzy" in line:
                fuzzy = True
            continue
        if line.startswith('"'):
            if current is None:
                raise CatalogueError(f"{where}: a string continues nothing")
            fields[current] += _unquote(line, where)
            continue
        keyword, _, rest = line.partition(" ")
        if keyword.startswith("msgstr[") and keyword.endswith("]"):
            keyword = f"msgstr{int(keyword[7:-1]):03d}"  # sortable: msgstr[10] after msgstr[9]
        elif keyword not in {"msgid", "msgid_plural", "msgstr", "msgctxt"}:
            raise CatalogueError(f"{where}: unknown keyword {keyword!r}")
        if keyword in {"msgid", "msgctxt"} and current is not None and current.startswith("msgstr"):
            flush()
        current = keyword
        fields[keyword] = _unquote(rest.strip(), where)
    if current is not None:
        flush()
    return entries


def compile_mo(entries: Mapping[str | tuple[str, str], list[str]]) -> bytes:
    """Compile parsed entries into .mo bytes (GNU format, as msgfmt writes); empty translations are left out."""
    pairs: list[tuple[bytes, bytes]] = []
    for key, strings in entries.items():
        if key != "" and not all(strings):
            continue  # untranslated: gettext shows the msgid
        msgid = "\0".join(key) if isinstance(key, tuple) else key
        pairs.append((msgid.encode(), "\0".join(strings).encode()))
    pairs.sort()
    ids = b"".join(k + b"\0" for k, _ in pairs)
    strs = b"".join(v + b"\0" for _, v in pairs)
    count = len(pairs)
    id_start = 7 * 4 + 16 * count
    str_start = id_start + len(ids)
    offsets: list[int] = []
    position = 0
    for k, _ in pairs:
        offsets += [len(k), id_start + position]
        position += len(k) + 1
    position = 0
    for _, v in pairs:
        offsets += [len(v), str_start + position]
        position += len(v) + 1
    header = struct.pack("Iiiiiii", 0x950412DE, 0, count, 7 * 4, 7 * 4 + count * 8, 0, 0)
    return header + struct.pack(f"{len(offsets)}i", *offsets) + ids + strs


@dataclass(frozen=True)
class Used:
    """A message the code uses, and where."""

    msgid: str | tuple[str, str]
    where: str


@dataclass(frozen=True)
class Catalogue:
    """One message domain: its .po files per language and the sources whose messages it holds."""

    locale_dir: Path
    domain: str
    roots: tuple[Path, ...]
    method_map: tuple[tuple[str, str], ...] = (("**.py", "python"),)
    options_map: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()
    keywords: tuple[tuple[str, Any], ...] | None = None  # None: Babel's defaults

    def path(self, lang: Lang) -> Path:
        """Return the .po file of a language."""
        return self.locale_dir / lang / "LC_MESSAGES" / f"{self.domain}.po"

    def translations(self, lang: Lang) -> _gettext.GNUTranslations:
        """Return the gettext translations of a language, compiled in memory from its .po file once."""
        return _translations(self.path(lang))

    def gettext(self, lang: Lang, message: str, **variables: Any) -> str:
        """Translate a message into a language, then fill its %(name)s placeholders."""
        text = self.translations(lang).gettext(message)
        return text % variables if variables else text

    def ngettext(self, lang: Lang, singular: str, plural: str, n: int, **variables: Any) -> str:
        """Translate a message with a count (Japanese has one form), filling %(num)s and the placeholders."""
        text = self.translations(lang).ngettext(singular, plural, n)
        return text % {"num": n, **variables}

    def used_messages(self, roots: Iterable[Path] | None = None) -> list[Used]:
        """Extract every message the sources use (needs Babel: a checkout's tool, not a run-time one)."""
        from babel.messages.extract import DEFAULT_KEYWORDS, extract_from_dir

        options = {pattern: dict(values) for pattern, values in self.options_map}
        keywords = DEFAULT_KEYWORDS if self.keywords is None else dict(self.keywords)
        found: list[Used] = []
        for root in self.roots if roots is None else roots:
            for filename, lineno, message, _comments, _context in extract_from_dir(
                str(root), method_map=list(self.method_map), options_map=options, keywords=keywords
            ):
                if not message or (isinstance(message, tuple) and not message[0]):
                    continue  # gettext(variable): nothing to check statically
                msgid = message if isinstance(message, str) else (message[0], message[1])
                found.append(Used(msgid, f"{root.name}/{filename}:{lineno}"))
        return found

    def missing_translations(self, roots: Iterable[Path] | None = None) -> list[str]:
        """Return one line per used message that a catalogue lacks or leaves untranslated (or fuzzy)."""
        from babel.messages.pofile import read_po

        problems: list[str] = []
        catalogues = {}
        for lang in LANGUAGES:
            with self.path(lang).open("rb") as handle:
                catalogues[lang] = read_po(handle, locale=lang, domain=self.domain)
        for used in self.used_messages(roots):
            key = used.msgid[0] if isinstance(used.msgid, tuple) else used.msgid
            for lang, catalogue in catalogues.items():
                entry = catalogue.get(key)
                if entry is None:
                    problems.append(f"{lang}: missing {key!r} (used at {used.where})")
                elif entry.fuzzy:
                    problems.append(f"{lang}: fuzzy {key!r} (used at {used.where})")
                elif not (all(entry.string) if isinstance(entry.string, tuple) else entry.string):
                    problems.append(f"{lang}: untranslated {key!r} (used at {used.where})")
        return problems


@cache
def _translations(path: Path) -> _gettext.GNUTranslations:
    entries = parse_po(path.read_text(encoding="utf-8"), str(path.name))
    return _gettext.GNUTranslations(io.BytesIO(compile_mo(entries)))


CLI: Final = Catalogue(
    LOCALE_DIR,
    DOMAIN,
    SOURCE_ROOTS,
    method_map=(("console/**.py", "ignore"), ("**.py", "python")),
    keywords=tuple(KEYWORDS.items()),
)


def gettext(lang: Lang, message: str, **variables: Any) -> str:
    """Translate a command-line or service message into a language, filling its %(name)s placeholders."""
    return CLI.gettext(lang, message, **variables)


def _(message: str, **variables: Any) -> str:
    """Translate a message into this process's language (see `process_lang`), filling its placeholders."""
    return CLI.gettext(process_lang(), message, **variables)


def ngettext(singular: str, plural: str, n: int, **variables: Any) -> str:
    """Translate a counted message into this process's language, filling %(num)s and the placeholders."""
    return CLI.ngettext(process_lang(), singular, plural, n, **variables)


def N_(message: str) -> str:  # the gettext name extractors look for
    """Mark a message for the catalogue without translating it now (it is translated where it is shown)."""
    return message


class Message(str):
    """A message in this process's language that can be shown again in another (an API request's)."""

    msgid: str
    variables: dict[str, Any]

    def __new__(cls, msgid: str, **variables: Any) -> Message:
        """Translate the message into this process's language and keep its id and placeholders."""
        made = super().__new__(cls, CLI.gettext(process_lang(), msgid, **variables))
        made.msgid = msgid
        made.variables = variables
        return made

    def text(self, lang: Lang) -> str:
        """Return the message in a language."""
        return CLI.gettext(lang, self.msgid, **self.variables)


M_ = Message  # the name the extractor looks for where a service raises a message the API may re-show


def localize(value: object, lang: Lang) -> str:
    """Return an exception's (or a value's) text in a language when it carries a Message, else str(value)."""
    if isinstance(value, BaseException) and len(value.args) == 1:
        value = value.args[0]
    return value.text(lang) if isinstance(value, Message) else str(value)


def message_of(value: object) -> str:
    """Return the Message an exception carries (an API handler re-shows it in the request's language), else str()."""
    if isinstance(value, BaseException) and len(value.args) == 1 and isinstance(value.args[0], Message):
        return value.args[0]
    return str(value)
