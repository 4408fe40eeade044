"""The console's message catalogue: English msgids, Japanese shown by default, read from .po files at start.

The .po files under locale/<lang>/LC_MESSAGES/ are the only form kept: they are compiled in memory when
first used (sekisho.common.i18n, the machinery the command lines share), so there is no compile step and
no .mo file to forget. A fuzzy or empty Japanese entry falls back to the English msgid;
tests/test_console_shell.py fails on any msgid missing from either catalogue. The console keeps its own
catalogue beside the command lines' one: it also holds the templates' messages, and a page's messages
stay next to the page.
"""

from __future__ import annotations

import gettext as _gettext
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

from babel.messages.catalog import Catalog
from babel.messages.pofile import read_po
from jinja2 import pass_context
from jinja2.runtime import Context

from sekisho.common.i18n import Catalogue, Used
from sekisho.controller.console.formats import LANGUAGES, Lang, as_lang

PACKAGE_DIR: Final = Path(__file__).resolve().parent
LOCALE_DIR: Final = PACKAGE_DIR / "locale"
DOMAIN: Final = "messages"
# Extracted from the console's Python code and its templates; later page families add their folders here
# by living under controller/console/.
_METHODS: Final = (("**/templates/**.html", "jinja2.ext:babel_extract"), ("**.py", "python"))
_OPTIONS: Final = (("**/templates/**.html", (("extensions", "jinja2.ext.i18n"), ("newstyle_gettext", "true"))),)
CATALOGUE: Final = Catalogue(LOCALE_DIR, DOMAIN, (PACKAGE_DIR,), method_map=_METHODS, options_map=_OPTIONS)


def N_(message: str) -> str:  # the gettext name extractors look for
    """Mark a message for the catalogue without translating it now (it is translated where it is shown)."""
    return message


def catalogue_path(lang: Lang) -> Path:
    """Return the .po file of a language."""
    return CATALOGUE.path(lang)


def read_catalogue(lang: Lang) -> Catalog:
    """Read a language's .po file."""
    with catalogue_path(lang).open("rb") as handle:
        return read_po(handle, locale=lang, domain=DOMAIN)


def translations(lang: Lang) -> _gettext.GNUTranslations:
    """Return the gettext translations of a language, compiled in memory from its .po file once."""
    return CATALOGUE.translations(lang)


def gettext(lang: Lang, message: str, **variables: Any) -> str:
    """Translate a message into a language, then fill its %(name)s placeholders."""
    return CATALOGUE.gettext(lang, message, **variables)


def ngettext(lang: Lang, singular: str, plural: str, n: int, **variables: Any) -> str:
    """Translate a message with a count (Japanese has one form), filling %(num)s and the placeholders."""
    return CATALOGUE.ngettext(lang, singular, plural, n, **variables)


# Jinja2's i18n extension with newstyle gettext calls these through the context, so one environment
# serves both languages: the template's `lang` variable picks the catalogue.
@pass_context
def _template_gettext(context: Context, message: str) -> str:
    return translations(as_lang(context.get("lang"))).gettext(message)


@pass_context
def _template_ngettext(context: Context, singular: str, plural: str, n: int) -> str:
    return translations(as_lang(context.get("lang"))).ngettext(singular, plural, n)


def template_callables() -> tuple[Any, Any]:
    """Return the (gettext, ngettext) pair to install on the console's Jinja2 environment."""
    return _template_gettext, _template_ngettext


def used_messages(roots: Iterable[Path] = (PACKAGE_DIR,)) -> list[Used]:
    """Extract every message used in the console's Python code and templates under the given folders."""
    return CATALOGUE.used_messages(roots)


def missing_translations(roots: Iterable[Path] = (PACKAGE_DIR,)) -> list[str]:
    """Return one line per used message that a catalogue lacks or leaves untranslated (or fuzzy)."""
    return CATALOGUE.missing_translations(roots)


def update_catalogues(roots: Iterable[Path] = (PACKAGE_DIR,)) -> dict[Lang, int]:
    """Add every used message missing from a catalogue (English: the msgid; Japanese: empty, to fill in).

    Messages no longer used anywhere are dropped, so a catalogue holds exactly what the console shows.
    """
    from babel.messages.pofile import write_po  # only the maintainer's update needs the writer

    added: dict[Lang, int] = {}
    used = used_messages(roots)
    for lang in LANGUAGES:
        catalogue = read_catalogue(lang)
        count = 0
        keys = {m.msgid[0] if isinstance(m.msgid, tuple) else m.msgid for m in used}
        for entry in list(catalogue):
            if entry.id and (entry.id[0] if isinstance(entry.id, tuple) else entry.id) not in keys:
                catalogue.delete(entry.id)
        for message in used:
            key = message.msgid[0] if isinstance(message.msgid, tuple) else message.msgid
            if catalogue.get(key) is not None:
                continue
            if isinstance(message.msgid, tuple):
                string: str | tuple[str, ...] = message.msgid if lang == "en" else ("",)
            else:
                string = message.msgid if lang == "en" else ""
            catalogue.add(message.msgid, string, locations=[(message.where.rsplit(":", 1)[0], 0)])
            count += 1
        with catalogue_path(lang).open("wb") as handle:
            write_po(handle, catalogue, width=120, omit_header=False, sort_output=False, include_lineno=False)
        added[lang] = count
    return added


def main(argv: list[str] | None = None) -> int:
    """`python -m sekisho.controller.console.i18n check|update`: list missing translations, or add stubs."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if args == ["update"]:
        for lang, count in update_catalogues().items():
            print(f"{lang}: {count} added")
    problems = missing_translations()
    for line in problems:
        print(line, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
