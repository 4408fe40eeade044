"""Parser for USBGuard's rule language, as usbguard 1.1.2 parses it (one rule per line).

Grammar (USBGuard's ``RuleParser/Grammar.hpp``; blanks are spaces and tabs, nothing else)::

    line       ::= "" | comment | rule [comment]
    comment    ::= blank* "#" anything
    rule       ::= target [blank+ device-id] (blank+ attribute)*
    target     ::= "allow" | "block" | "reject"            ("match", "device": cannot be represented)
    attribute  ::= name blank+ value | name blank+ [operator blank+] "{" blank* value (blank+ value)* blank* "}"
    operator   ::= "all-of" | "one-of" | "none-of" | "equals-ordered" | "equals" | "match-all"
    device-id  ::= (hex4 | "*") ":" (hex4 | "*")            (a "*" vendor needs a "*" product)
    interface  ::= hex2 ":" (hex2 | "*") ":" (hex2 | "*")   (a "*" subclass needs a "*" protocol)
    string     ::= '"' (any character but CR, LF, '"', '\\' | '\\"' | '\\\\' | '\\x' hex2)* '"'

A file's lines end at LF only: a CR, vertical tab, form feed, NEL, U+2028 or U+2029 is an ordinary
character (an error outside a string), never a line break. Every line USBGuard refuses is refused
here (a ``RuleProblem`` of kind ``syntax``: leading or trailing blanks, a blank-only line, other
whitespace, unknown escapes, a missing blank after an attribute name, an attribute given twice, …).
Lines USBGuard accepts but sekisho does not enforce are refused as ``unsupported``: rule conditions
(``if …``), ``label``, the ``match`` and ``device`` targets, and a rule glued to the next target
(USBGuard reads ``block id 1234:5678allow`` as one *allow* rule). Such a rule is left out, never
half-applied. Ids keep the case they are written in (USBGuard compares them case-sensitively).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

from sekisho.agents.usb.rules.model import (
    STRING_ATTRIBUTES,
    AttributeName,
    Condition,
    DeviceIdPattern,
    InterfacePattern,
    Rule,
    SetOperator,
    StringValue,
    Target,
    Value,
)
from sekisho.agents.usb.rules.ruleset import RuleSet

ProblemKind = Literal["syntax", "unsupported", "mass_storage", "advice"]

_BLANKS = " \t"
_HEX = frozenset("0123456789abcdefABCDEF")
# USBGuard's targets in its grammar's order; the last two exist for its IPC and have no meaning here.
_TARGETS = ("allow", "block", "reject", "match", "device")
_UNSUPPORTED_TARGETS = frozenset({"match", "device"})
# Longest first where one name is a prefix of another (equals-ordered / equals).
_OPERATORS = ("all-of", "one-of", "none-of", "equals-ordered", "equals", "match-all")
_ATTRIBUTES = tuple(sorted((a.value for a in AttributeName), key=len, reverse=True))
# Attributes of the full language this subset deliberately does not carry, with the reason given.
_UNSUPPORTED = {
    "if": "rule conditions ('if …') cannot be represented: sekisho decides on device attributes only",
    "label": "'label' cannot be represented: sekisho rules carry no labels",
}


@dataclass(frozen=True, slots=True)
class RuleProblem:
    """Why one rule line was not taken: 1-based line and column, reason, and what kind of problem it is."""

    line: int
    column: int
    reason: str
    kind: ProblemKind = "syntax"
    text: str = ""

    def __str__(self) -> str:
        return f"line {self.line}, column {self.column}: {self.reason}"


class RuleSyntaxError(ValueError):
    """A single rule text could not be parsed; ``problem`` says where and why."""

    def __init__(self, problem: RuleProblem) -> None:
        super().__init__(str(problem))
        self.problem = problem


class ParsedRules(NamedTuple):
    """The rules that parsed, in order, and a problem for every line that did not."""

    ruleset: RuleSet
    problems: tuple[RuleProblem, ...]


class _Fail(Exception):
    def __init__(self, index: int, reason: str, kind: ProblemKind = "syntax") -> None:
        super().__init__(reason)
        self.column = index + 1
        self.reason = reason
        self.kind = kind


class _LineParser:
    """One line, parsed left to right the way USBGuard's PEG grammar consumes it."""

    def __init__(self, line: str) -> None:
        self.s = line
        self.n = len(line)

    # --- lexical helpers ----------------------------------------------------------------------

    def _blanks(self, i: int) -> int:
        while i < self.n and self.s[i] in _BLANKS:
            i += 1
        return i

    def _is_comment(self, i: int) -> bool:
        j = self._blanks(i)
        return j < self.n and self.s[j] == "#"

    def _keyword(self, i: int, words: tuple[str, ...]) -> str | None:
        return next((w for w in words if self.s.startswith(w, i)), None)

    def _describe(self, i: int) -> str:
        if i >= self.n:
            return "the end of the line"
        char = self.s[i]
        if char.isprintable() and char not in _BLANKS:
            end = i
            while end < self.n and end - i < 20 and self.s[end] not in _BLANKS and self.s[end].isprintable():
                end += 1
            return repr(self.s[i:end])
        return f"U+{ord(char):04X}" + (" (a blank)" if char in _BLANKS else "")

    # --- the line -----------------------------------------------------------------------------

    def parse(self) -> Rule | None:
        if self.n == 0 or self._is_comment(0):
            return None
        if self.s[0] in _BLANKS:
            raise _Fail(0, "a rule must start at the beginning of the line (USBGuard 1.1.2 refuses leading blanks)")
        target_text = self._keyword(0, _TARGETS)
        if target_text is None:
            raise _Fail(0, f"a rule starts with allow, block or reject, not {self._describe(0)}")
        if target_text in _UNSUPPORTED_TARGETS:
            raise _Fail(
                0,
                f"the '{target_text}' target cannot be represented: sekisho rules allow, block or reject",
                "unsupported",
            )
        conditions: list[Condition] = []
        seen: set[AttributeName] = set()
        i = len(target_text)
        j = self._blanks(i)
        if j > i and j < self.n and (self.s[j] in _HEX or self.s[j] == "*"):
            # The positional device id: `allow 1050:0011 …` means `allow id 1050:0011 …`.
            parsed = self._device_id(j, required=False)
            if parsed is not None:
                value, i = parsed
                conditions.append(Condition(AttributeName.ID, SetOperator.EQUALS, (value,)))
                seen.add(AttributeName.ID)
        while True:
            j = self._blanks(i)
            if j == i or (j < self.n and self.s[j] == "#"):
                break
            if j == self.n:
                raise _Fail(i, "trailing blanks after the rule (USBGuard 1.1.2 refuses them)")
            attribute, i = self._attribute(j, seen)
            conditions.append(attribute)
        if i < self.n and not self._is_comment(i):
            glued = self._keyword(i, _TARGETS)
            if glued is not None:
                raise _Fail(
                    i,
                    f"'{glued}' directly after the rule: USBGuard would merge it into this rule "
                    f"(its target becoming {glued}); write one rule per line",
                    "unsupported",
                )
            raise _Fail(i, f"expected a blank, a comment or the end of the line, not {self._describe(i)}")
        return Rule(Target(target_text), tuple(conditions))

    # --- attributes ---------------------------------------------------------------------------

    def _attribute(self, i: int, seen: set[AttributeName]) -> tuple[Condition, int]:
        for word, reason in _UNSUPPORTED.items():
            if self.s.startswith(word, i) and self._blanks(i + len(word)) > i + len(word):
                raise _Fail(i, reason, "unsupported")
        name = self._keyword(i, _ATTRIBUTES)
        end = i + len(name) if name is not None else i
        if name is None or end == self.n or self.s[end] not in _BLANKS:
            raise _Fail(i, f"expected an attribute name and a blank, not {self._describe(i)}")
        attribute = AttributeName(name)
        if attribute in seen:
            raise _Fail(i, f"attribute {attribute} given twice")
        seen.add(attribute)
        k = self._blanks(end)
        operator = SetOperator.EQUALS
        op = self._keyword(k, _OPERATORS)
        if op is not None:
            after = k + len(op)
            brace = self._blanks(after)
            if brace == after or brace >= self.n or self.s[brace] != "{":
                raise _Fail(k, f"operator {op} must be followed by a blank and '{{'")
            operator, k = SetOperator(op), brace
        if k < self.n and self.s[k] == "{":
            values, k = self._set(attribute, k)
            return Condition(attribute, operator, tuple(values)), k
        value, k = self._value(attribute, k)
        return Condition(attribute, operator, (value,)), k

    def _set(self, attribute: AttributeName, brace: int) -> tuple[list[Value], int]:
        values: list[Value] = []
        k = self._blanks(brace + 1)
        if k < self.n and self.s[k] == "}":
            raise _Fail(brace, f"empty set for {attribute}")
        while True:
            value, k = self._value(attribute, k)
            values.append(value)
            after = self._blanks(k)
            if after < self.n and self.s[after] == "}":
                return values, after + 1
            if after == k or after >= self.n:
                raise _Fail(after, f"unterminated set for {attribute}: expected a blank and a value, or '}}'")
            k = after

    def _value(self, attribute: AttributeName, i: int) -> tuple[Value, int]:
        if attribute in STRING_ATTRIBUTES:
            return self._string(attribute, i)
        if attribute is AttributeName.ID:
            parsed = self._device_id(i, required=True)
            assert parsed is not None
            return parsed
        return self._interface(i)

    def _device_id(self, i: int, *, required: bool) -> tuple[DeviceIdPattern, int] | None:
        parts: list[str | None] = []
        k = i
        for index in range(2):
            if k < self.n and self.s[k] == "*":
                parts.append(None)
                k += 1
            elif k + 4 <= self.n and all(c in _HEX for c in self.s[k : k + 4]):
                parts.append(self.s[k : k + 4])
                k += 4
            else:
                break
            if index == 0:
                if k >= self.n or self.s[k] != ":":
                    parts = []
                    break
                k += 1
        if len(parts) != 2:
            if not required:
                return None
            raise _Fail(i, f"device id must be vvvv:pppp (4 hex digits or '*' each), not {self._describe(i)}")
        if parts[0] is None and parts[1] is not None:
            raise _Fail(i, "a wildcard vendor needs a wildcard product ('*:*')")
        return DeviceIdPattern(parts[0], parts[1]), k

    def _interface(self, i: int) -> tuple[InterfacePattern, int]:
        fields: list[int | None] = []
        k = i
        for index in range(3):
            if index > 0 and k < self.n and self.s[k] == "*":
                fields.append(None)
                k += 1
            elif k + 2 <= self.n and all(c in _HEX for c in self.s[k : k + 2]):
                fields.append(int(self.s[k : k + 2], 16))
                k += 2
            else:
                raise _Fail(
                    i, f"interface type must be cc:ss:pp (2 hex digits, '*' after the class), not {self._describe(i)}"
                )
            if index < 2:
                if k >= self.n or self.s[k] != ":":
                    raise _Fail(i, f"interface type must be cc:ss:pp, not {self._describe(i)}")
                k += 1
        if fields[1] is None and fields[2] is not None:
            raise _Fail(i, "a wildcard subclass needs a wildcard protocol (cc:*:*)")
        cls = fields[0]
        assert cls is not None
        return InterfacePattern(cls, fields[1], fields[2]), k

    def _string(self, attribute: AttributeName, start: int) -> tuple[StringValue, int]:
        if start >= self.n or self.s[start] != '"':
            raise _Fail(start, f"{attribute} takes a quoted string, not {self._describe(start)}")
        out = bytearray()
        i = start + 1
        while i < self.n:
            char = self.s[i]
            if char == '"':
                return StringValue(out.decode("utf-8", "surrogateescape")), i + 1
            if char == "\r":
                raise _Fail(i, "carriage return inside a string")
            if char == "\\":
                escape = self.s[i + 1] if i + 1 < self.n else ""
                if escape in ('"', "\\"):
                    out.append(ord(escape))
                    i += 2
                    continue
                if escape == "x":
                    digits = self.s[i + 2 : i + 4]
                    if len(digits) != 2 or not all(c in _HEX for c in digits):
                        raise _Fail(i, "\\x must be followed by two hex digits")
                    out.append(int(digits, 16))
                    i += 4
                    continue
                shown = repr(escape)[1:-1] if escape else "at the end of the line"
                raise _Fail(i, f'unknown escape \\{shown}: USBGuard accepts only \\", \\\\ and \\xHH')
            try:
                out.extend(char.encode("utf-8", "surrogateescape"))
            except UnicodeEncodeError as err:
                raise _Fail(i, f"U+{ord(char):04X} is not a character") from err
            i += 1
        raise _Fail(start, "unterminated string")


def _parse_line(line: str, line_number: int) -> Rule | RuleProblem | None:
    try:
        return _LineParser(line).parse()
    except _Fail as fail:
        return RuleProblem(line_number, fail.column, fail.reason, fail.kind, line)


def parse_rule(text: str) -> Rule:
    """Parse one rule (a trailing LF is allowed); raise RuleSyntaxError (with a RuleProblem) otherwise."""
    line = text.removesuffix("\n")
    if "\n" in line:
        raise RuleSyntaxError(
            RuleProblem(1, line.index("\n") + 1, "parse_rule takes one line; use parse_rules", text=text)
        )
    result = _parse_line(line, 1)
    if result is None:
        raise RuleSyntaxError(RuleProblem(1, 1, "no rule on the line", text=text))
    if isinstance(result, RuleProblem):
        raise RuleSyntaxError(result)
    return result


def parse_rules(text: str, *, default_target: Target = Target.BLOCK) -> ParsedRules:
    """Parse a rules file (lines end at LF only): every valid line becomes a rule, every other a RuleProblem.

    Read files with ``read_rules_text`` so that bytes that are not UTF-8 reach string values as USBGuard
    sees them (bytes) instead of failing the whole file.
    """
    rules: list[Rule] = []
    lines: list[int] = []
    problems: list[RuleProblem] = []
    for number, line in enumerate(text.split("\n"), start=1):
        result = _parse_line(line, number)
        if isinstance(result, Rule):
            rules.append(result)
            lines.append(number)
        elif isinstance(result, RuleProblem):
            problems.append(result)
    return ParsedRules(RuleSet(tuple(rules), default_target, source_lines=tuple(lines)), tuple(problems))


def read_rules_text(data: bytes) -> str:
    """Decode a rules file's bytes: UTF-8, other bytes kept as ``surrogateescape`` characters."""
    return data.decode("utf-8", "surrogateescape")


def printable(text: str) -> str:
    """Return text safe to print: ``surrogateescape`` bytes and control characters shown as escapes."""
    raw = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(
        c if c.isprintable() or c == " " else f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}" for c in raw
    )
