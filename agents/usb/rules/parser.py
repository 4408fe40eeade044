"""Parser for the USBGuard-compatible subset of the rule language (one rule per line).

Grammar (from ``usbguard-rules.conf(5)``)::

    rule       ::= target [device-id] attribute*
    target     ::= "allow" | "block" | "reject"
    attribute  ::= name value | name [operator] "{" value+ "}"
    operator   ::= "all-of" | "one-of" | "none-of" | "equals" | "equals-ordered" | "match-all"

Lines that are blank or start with ``#`` are skipped; ``#`` outside quotes ends a rule. Anything the
subset cannot represent — rule conditions (``if …``), ``label``, unknown attributes — is reported as a
``RuleProblem`` with its line and column; such a rule is left out, never half-applied.
"""

from __future__ import annotations

from collections.abc import Iterator
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

ProblemKind = Literal["syntax", "unsupported"]

# Attributes of the full language this subset deliberately does not carry, with the reason given.
_UNSUPPORTED = {
    "if": "rule conditions ('if …') cannot be represented: sekisho decides on device attributes only",
    "label": "'label' cannot be represented: sekisho rules carry no labels",
}
_ESCAPES = {
    '"': 0x22,
    "\\": 0x5C,
    "'": 0x27,
    "n": 0x0A,
    "t": 0x09,
    "r": 0x0D,
    "a": 0x07,
    "b": 0x08,
    "f": 0x0C,
    "v": 0x0B,
}


@dataclass(frozen=True, slots=True)
class RuleProblem:
    """Why one rule line was not taken: 1-based line and column, reason, and whether it is a syntax error."""

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
    def __init__(self, column: int, reason: str, kind: ProblemKind = "syntax") -> None:
        super().__init__(reason)
        self.column = column
        self.reason = reason
        self.kind = kind


@dataclass(frozen=True, slots=True)
class _Token:
    kind: Literal["word", "string", "{", "}"]
    text: str
    column: int


def _tokens(line: str) -> Iterator[_Token]:
    """Yield tokens lazily so that text after an unsupported ``if`` is never tokenised."""
    i, n = 0, len(line)
    while i < n:
        char = line[i]
        if char.isspace():
            i += 1
        elif char == "#":
            return
        elif char in "{}":
            yield _Token(char, char, i + 1)  # type: ignore[arg-type]
            i += 1
        elif char == '"':
            start = i
            text, i = _read_string(line, i)
            yield _Token("string", text, start + 1)
        else:
            start = i
            while i < n and not line[i].isspace() and line[i] not in '{}"#':
                i += 1
            yield _Token("word", line[start:i], start + 1)


def _read_string(line: str, start: int) -> tuple[str, int]:
    out = bytearray()
    i = start + 1
    while i < len(line):
        char = line[i]
        if char == '"':
            try:
                return out.decode("utf-8"), i + 1
            except UnicodeDecodeError as err:
                raise _Fail(start + 1, "string is not valid UTF-8 after unescaping") from err
        if char == "\\":
            if i + 1 >= len(line):
                break
            escape = line[i + 1]
            if escape == "x":
                digits = line[i + 2 : i + 4]
                if len(digits) != 2 or not all(c in "0123456789abcdefABCDEF" for c in digits):
                    raise _Fail(i + 1, "\\x must be followed by two hex digits")
                out.append(int(digits, 16))
                i += 4
                continue
            if escape not in _ESCAPES:
                raise _Fail(i + 1, f"unknown escape \\{escape}")
            out.append(_ESCAPES[escape])
            i += 2
            continue
        out.extend(char.encode("utf-8", errors="surrogatepass"))
        i += 1
    raise _Fail(start + 1, "unterminated string")


def _parse_device_id(token: _Token) -> DeviceIdPattern:
    vendor, sep, product = token.text.partition(":")
    if not sep or ":" in product:
        raise _Fail(token.column, f"device id must be vvvv:pppp, not {token.text!r}")
    parts: list[str | None] = []
    for part in (vendor, product):
        if part == "*":
            parts.append(None)
        elif len(part) == 4 and all(c in "0123456789abcdefABCDEF" for c in part):
            parts.append(part.lower())
        else:
            raise _Fail(token.column, f"device id parts are 4 hex digits or '*', not {token.text!r}")
    if parts[0] is None and parts[1] is not None:
        raise _Fail(token.column, "a wildcard vendor needs a wildcard product ('*:*')")
    return DeviceIdPattern(parts[0], parts[1])


def _parse_interface(token: _Token) -> InterfacePattern:
    fields = token.text.split(":")
    if len(fields) != 3:
        raise _Fail(token.column, f"interface type must be cc:ss:pp, not {token.text!r}")
    values: list[int | None] = []
    for index, part in enumerate(fields):
        if part == "*" and index > 0:
            values.append(None)
        elif len(part) == 2 and all(c in "0123456789abcdefABCDEF" for c in part):
            values.append(int(part, 16))
        else:
            raise _Fail(token.column, f"interface fields are 2 hex digits (or '*' after the class), not {token.text!r}")
    if values[1] is None and values[2] is not None:
        raise _Fail(token.column, "a wildcard subclass needs a wildcard protocol (cc:*:*)")
    cls = values[0]
    assert cls is not None
    return InterfacePattern(cls, values[1], values[2])


def _parse_value(attribute: AttributeName, token: _Token) -> Value:
    if attribute in STRING_ATTRIBUTES:
        if token.kind != "string":
            raise _Fail(token.column, f"{attribute} takes a quoted string, not {token.text!r}")
        return StringValue(token.text)
    if token.kind != "word":
        raise _Fail(token.column, f"{attribute} takes an unquoted value, not {token.text!r}")
    if attribute is AttributeName.ID:
        return _parse_device_id(token)
    return _parse_interface(token)


class _LineParser:
    def __init__(self, line: str) -> None:
        self._tokens = _tokens(line)
        self._end = len(line) + 1
        self._peeked: _Token | None = None

    def peek(self) -> _Token | None:
        if self._peeked is None:
            self._peeked = next(self._tokens, None)
        return self._peeked

    def take(self) -> _Token | None:
        token = self.peek()
        self._peeked = None
        return token

    def parse(self) -> Rule | None:
        first = self.take()
        if first is None:
            return None
        if first.kind != "word" or first.text not in Target.__members__.values():
            raise _Fail(first.column, f"a rule starts with allow, block or reject, not {first.text!r}")
        target = Target(first.text)
        conditions: list[Condition] = []
        seen: set[AttributeName] = set()
        token = self.peek()
        if token is not None and token.kind == "word" and ":" in token.text:
            # The positional device id: `allow 1050:0011 …` means `allow id 1050:0011 …`.
            self.take()
            conditions.append(Condition(AttributeName.ID, SetOperator.EQUALS, (_parse_device_id(token),)))
            seen.add(AttributeName.ID)
        while (token := self.take()) is not None:
            if token.kind != "word":
                raise _Fail(token.column, f"expected an attribute name, not {token.text!r}")
            if token.text in _UNSUPPORTED:
                raise _Fail(token.column, _UNSUPPORTED[token.text], "unsupported")
            if token.text not in AttributeName.__members__.values():
                raise _Fail(token.column, f"unknown attribute {token.text!r} cannot be represented", "unsupported")
            attribute = AttributeName(token.text)
            if attribute in seen:
                raise _Fail(token.column, f"attribute {attribute} given twice")
            seen.add(attribute)
            conditions.append(self._condition(attribute, token))
        return Rule(target, tuple(conditions))

    def _condition(self, attribute: AttributeName, name: _Token) -> Condition:
        token = self.take()
        if token is None:
            raise _Fail(self._end, f"{attribute} needs a value")
        operator = SetOperator.EQUALS
        if token.kind == "word" and token.text in SetOperator.__members__.values():
            operator = SetOperator(token.text)
            token = self.take()
            if token is None or token.kind != "{":
                raise _Fail(token.column if token else self._end, f"operator {operator} must be followed by '{{'")
        if token.kind != "{":
            return Condition(attribute, operator, (_parse_value(attribute, token),))
        values: list[Value] = []
        while True:
            item = self.take()
            if item is None:
                raise _Fail(token.column, "unterminated set: missing '}'")
            if item.kind == "}":
                break
            values.append(_parse_value(attribute, item))
        if not values:
            raise _Fail(token.column, f"empty set for {attribute}")
        return Condition(attribute, operator, tuple(values))


def _parse_line(line: str, line_number: int) -> Rule | RuleProblem | None:
    try:
        return _LineParser(line).parse()
    except _Fail as fail:
        return RuleProblem(line_number, fail.column, fail.reason, fail.kind, line.strip())


def parse_rule(text: str) -> Rule:
    """Parse one rule; raise RuleSyntaxError (with a RuleProblem) if it is invalid or empty."""
    if "\n" in text.strip("\n"):
        raise RuleSyntaxError(RuleProblem(1, 1, "parse_rule takes one line; use parse_rules", text=text))
    result = _parse_line(text.strip("\n"), 1)
    if result is None:
        raise RuleSyntaxError(RuleProblem(1, 1, "no rule on the line", text=text))
    if isinstance(result, RuleProblem):
        raise RuleSyntaxError(result)
    return result


def parse_rules(text: str, *, default_target: Target = Target.BLOCK) -> ParsedRules:
    """Parse a rules file: every valid line becomes a rule, every invalid one a RuleProblem."""
    rules: list[Rule] = []
    lines: list[int] = []
    problems: list[RuleProblem] = []
    for number, line in enumerate(text.splitlines(), start=1):
        result = _parse_line(line, number)
        if isinstance(result, Rule):
            rules.append(result)
            lines.append(number)
        elif isinstance(result, RuleProblem):
            problems.append(result)
    return ParsedRules(RuleSet(tuple(rules), default_target, source_lines=tuple(lines)), tuple(problems))
