"""The USBGuard-compatible rule language: corpora, matching on fake sysfs devices, default policy, fuzzing."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from sekisho.agents.usb.rules import (
    AttributeName,
    Condition,
    DeviceIdPattern,
    InterfacePattern,
    Rule,
    RuleProblem,
    RuleSet,
    RuleSyntaxError,
    SetOperator,
    StringValue,
    Target,
    decide_device,
    decide_unreadable,
    default_ruleset,
    import_rules,
    parse_rule,
    parse_rules,
)
from sekisho.agents.usb.rules.cli import app
from sekisho.agents.usb.rules.model import Value
from sekisho.agents.usb.rules.policy import BADUSB_REASON, NO_INTERFACES_REASON, UNREADABLE_REASON
from sekisho.drivers.usb import SysfsUsb, UsbDescriptorError, UsbDevice
from sekisho.drivers.usb.fake import FakeSysfsTree

DATA = Path(__file__).parent / "data" / "usb"
SERIAL = "4C530001234567891234"


def _corpus(name: str) -> list[tuple[int, str]]:
    lines = (DATA / name).read_text(encoding="utf-8").splitlines()
    return [(n, line) for n, line in enumerate(lines, start=1) if line.strip() and not line.lstrip().startswith("#")]


GOOD = _corpus("rules.good")
BAD = _corpus("rules.bad")


@pytest.mark.parametrize(("line_number", "text"), GOOD, ids=[f"line{n}" for n, _ in GOOD])
def test_good_rule_parses_and_round_trips(line_number: int, text: str) -> None:
    rule = parse_rule(text)
    assert parse_rule(rule.to_text()) == rule
    assert parse_rule(rule.to_text()).to_text() == rule.to_text()


@pytest.mark.parametrize(("line_number", "text"), BAD, ids=[f"line{n}" for n, _ in BAD])
def test_bad_rule_is_a_problem_with_line_and_reason(line_number: int, text: str) -> None:
    with pytest.raises(RuleSyntaxError) as caught:
        parse_rule(text)
    assert caught.value.problem.reason and caught.value.problem.column >= 1


def test_bad_corpus_gives_one_problem_per_line_with_its_number() -> None:
    ruleset, problems = parse_rules((DATA / "rules.bad").read_text(encoding="utf-8"))
    assert len(ruleset) == 0
    assert [p.line for p in problems] == [n for n, _ in BAD]


def test_good_corpus_as_a_file_has_no_problems() -> None:
    ruleset, problems = parse_rules((DATA / "rules.good").read_text(encoding="utf-8"))
    assert problems == ()
    assert list(ruleset.source_lines) == [n for n, _ in GOOD]


def test_unsupported_features_are_reported_as_cannot_represent() -> None:
    _, problems = parse_rules('allow\nallow if true\nblock label "x"\nallow with-port "1"\n')
    assert [(p.line, p.column, p.kind) for p in problems] == [
        (2, 7, "unsupported"),
        (3, 7, "unsupported"),
        (4, 7, "unsupported"),
    ]
    assert "cannot be represented" in problems[0].reason


def test_positional_and_explicit_id_are_the_same_rule() -> None:
    assert parse_rule("allow 046D:C52B") == parse_rule("allow id 046d:c52b")
    assert parse_rule("allow with-interface { 03:01:01 }") == parse_rule("allow with-interface 03:01:01")


def test_string_escapes() -> None:
    rule = parse_rule(r'allow name "a\"b\\c\x41\xe3\x83\x90"')
    assert rule.conditions[0].values == (StringValue('a"b\\cAバ'),)
    assert rule.to_text() == r'allow name "a\"b\\cA\xe3\x83\x90"'


# --- matching ------------------------------------------------------------------------------------


@pytest.fixture
def devices(tmp_path: Path) -> dict[str, UsbDevice]:
    """Devices read from a fake tree: stick, keyboard behind a hub, BadUSB, vendor gadget, phone."""
    tree = FakeSysfsTree(tmp_path / "devices")
    tree.add_root_hub(1)
    tree.add_device(
        "1-1", 0x05E3, 0x0608, cls=0x09, interfaces=[(0x09, 0x00, 0x00)], name="USB2.0 Hub", connect_type="hardwired"
    )
    tree.add_device("1-2", 0x0781, 0x5581, SERIAL, interfaces=[(0x08, 0x06, 0x50)], name="Ultra")
    tree.add_device("1-1.3", 0x046D, 0xC31C, interfaces=[(0x03, 0x01, 0x01), (0x03, 0x00, 0x00)], name="USB Keyboard")
    tree.add_device("1-1.4", 0x046D, 0xC077, interfaces=[(0x03, 0x01, 0x02)], name="USB Optical Mouse")
    tree.add_device("1-3", 0x1234, 0x5678, "BAD1", interfaces=[(0x08, 0x06, 0x50), (0x03, 0x01, 0x01)])
    tree.add_device("1-4", 0x0BDA, 0x8179, "00E04C0001", interfaces=[(0xFF, 0xFF, 0xFF)], name="WLAN")
    tree.add_device("1-5", 0x04E8, 0x6860, "R58M12345", interfaces=[(0x06, 0x01, 0x01)], name="Galaxy")
    tree.add_device("1-6", 0x2109, 0x0001, interfaces=[], name="Nothing")
    sysfs = SysfsUsb(tree.root)
    return {d.sys_name: d for d in sysfs.scan().devices}


def _matches(text: str, device: UsbDevice) -> bool:
    return parse_rule(text).matches(device)


def test_match_on_id_with_wildcards(devices: dict[str, UsbDevice]) -> None:
    stick = devices["1-2"]
    assert _matches("allow 0781:5581", stick)
    assert _matches("allow 0781:*", stick)
    assert _matches("allow *:*", stick)
    assert not _matches("allow 0781:5582", stick)
    assert _matches("allow id one-of { 1111:* 0781:* }", stick)
    assert not _matches("allow id none-of { 0781:* }", stick)


def test_match_on_hash_parent_hash_name_serial_port(devices: dict[str, UsbDevice]) -> None:
    keyboard, hub = devices["1-1.3"], devices["1-1"]
    assert _matches(f'allow hash "{keyboard.device_hash}"', keyboard)
    assert not _matches(f'allow hash "{hub.device_hash}"', keyboard)
    assert _matches(f'allow parent-hash "{hub.device_hash}"', keyboard)
    assert _matches('allow name "USB Keyboard"', keyboard)
    assert not _matches('allow name "usb keyboard"', keyboard)
    assert _matches(f'allow serial "{SERIAL}"', devices["1-2"])
    assert _matches('allow serial ""', keyboard)
    assert _matches('allow via-port "1-1.3"', keyboard)
    assert _matches('allow via-port one-of { "1-2" "1-1.3" }', keyboard)
    assert _matches('allow via-port "usb1"', devices["usb1"])


def test_match_on_connect_type(devices: dict[str, UsbDevice]) -> None:
    assert _matches('allow with-connect-type "hardwired"', devices["1-1"])
    assert _matches('allow with-connect-type "hotplug"', devices["1-2"])
    assert _matches('allow with-connect-type none-of { "hotplug" }', devices["usb1"])  # unknown


def test_interface_set_operators(devices: dict[str, UsbDevice]) -> None:
    keyboard = devices["1-1.3"]  # 03:01:01 03:00:00
    # all-of: every rule value present on the device
    assert _matches("allow with-interface all-of { 03:01:01 03:00:* }", keyboard)
    assert not _matches("allow with-interface all-of { 03:01:01 08:*:* }", keyboard)
    # one-of: at least one
    assert _matches("allow with-interface one-of { 08:*:* 03:01:* }", keyboard)
    assert not _matches("allow with-interface one-of { 08:*:* ff:*:* }", keyboard)
    # none-of
    assert _matches("allow with-interface none-of { 08:*:* ff:*:* }", keyboard)
    assert not _matches("allow with-interface none-of { 03:00:00 }", keyboard)
    # equals: same size, both ways
    assert _matches("allow with-interface equals { 03:00:* 03:01:01 }", keyboard)
    assert not _matches("allow with-interface equals { 03:*:* }", keyboard)
    assert not _matches("allow with-interface 03:01:01", keyboard)  # single value = equals
    assert _matches("allow with-interface 08:*:*", devices["1-2"])
    # equals-ordered: position by position
    assert _matches("allow with-interface equals-ordered { 03:01:01 03:00:00 }", keyboard)
    assert not _matches("allow with-interface equals-ordered { 03:00:00 03:01:01 }", keyboard)
    # match-all: the device's interfaces are a subset of the rule's
    assert _matches("allow with-interface match-all { 03:*:* 09:*:* }", keyboard)
    assert not _matches("allow with-interface match-all { 03:01:* }", keyboard)


def test_equals_is_stricter_than_a_count_when_patterns_overlap(devices: dict[str, UsbDevice]) -> None:
    # Regression guard: USBGuard's count-only check would let 08 + 03 through `equals { 08:*:* 08:06:* }`.
    assert not _matches("allow with-interface equals { 08:*:* 08:06:* }", devices["1-3"])


def test_every_condition_must_hold(devices: dict[str, UsbDevice]) -> None:
    stick = devices["1-2"]
    assert _matches(f'allow 0781:5581 serial "{SERIAL}" with-interface 08:06:50 via-port "1-2"', stick)
    assert not _matches(f'allow 0781:5581 serial "{SERIAL}" via-port "1-3"', stick)


def test_ruleset_first_match_and_default(devices: dict[str, UsbDevice]) -> None:
    ruleset, problems = parse_rules("# comment\nallow 0781:*\n\nblock 0781:5581\n", default_target=Target.REJECT)
    assert not problems
    first = ruleset.decide(devices["1-2"])
    assert (first.target, first.rule_index, first.rule_text) == (Target.ALLOW, 0, "allow id 0781:*")
    assert "line 2" in first.reason
    default = ruleset.decide(devices["1-1.3"])
    assert (default.target, default.rule_index, default.rule_text) == (Target.REJECT, None, "default")


# --- default policy --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sys_name", "target"),
    [
        ("usb1", Target.ALLOW),  # root hub
        ("1-1", Target.ALLOW),  # hub
        ("1-1.3", Target.ALLOW),  # keyboard
        ("1-1.4", Target.ALLOW),  # mouse
        ("1-2", Target.BLOCK),  # USB stick
        ("1-3", Target.REJECT),  # storage + HID
        ("1-4", Target.BLOCK),  # vendor-specific
        ("1-5", Target.BLOCK),  # MTP/PTP phone
        ("1-6", Target.BLOCK),  # no interfaces
    ],
)
def test_default_policy(devices: dict[str, UsbDevice], sys_name: str, target: Target) -> None:
    assert decide_device(devices[sys_name]).target is target


def test_default_policy_reasons(devices: dict[str, UsbDevice]) -> None:
    assert decide_device(devices["1-3"]).reason == BADUSB_REASON
    assert decide_device(devices["1-6"]).reason == NO_INTERFACES_REASON
    assert "08:*:*" in decide_device(devices["1-2"]).rule_text


def test_badusb_is_rejected_even_if_an_admin_rule_allows_it(devices: dict[str, UsbDevice]) -> None:
    permissive = parse_rules("allow *:*").ruleset
    assert decide_device(devices["1-3"], permissive).target is Target.REJECT
    assert decide_device(devices["1-2"], permissive).target is Target.ALLOW


def test_unreadable_device_is_blocked(tmp_path: Path) -> None:
    tree = FakeSysfsTree(tmp_path)
    tree.add_root_hub(1)
    tree.add_device("1-2", 0x1234, 0x5678, descriptors=b"\x00garbage")
    with pytest.raises(UsbDescriptorError) as caught:
        SysfsUsb(tree.root).read_device("1-2")
    decision = decide_unreadable(caught.value)
    assert decision.target is Target.BLOCK and decision.reason.startswith(UNREADABLE_REASON)
    assert decide_unreadable().reason == UNREADABLE_REASON


def test_default_ruleset_round_trips() -> None:
    ruleset = default_ruleset()
    assert parse_rules(ruleset.to_text()).ruleset.rules == ruleset.rules


# --- importer and CLI ----------------------------------------------------------------------------


def test_import_reports_unrepresentable_rules_and_hash_warnings() -> None:
    text = (DATA / "rules.good").read_text() + "allow if random\n"
    report = import_rules(text)
    assert not report.ok and [p.kind for p in report.problems] == ["unsupported"]
    assert report.problems[0].line == len(text.splitlines())
    assert len(report.rules) == len(GOOD)
    assert report.warnings and all("re-pin" in w.reason for w in report.warnings)


def test_cli_import_rules(tmp_path: Path) -> None:
    runner = CliRunner()
    good = tmp_path / "good.rules"
    good.write_text("allow with-interface 03:01:01\nblock\n")
    output = tmp_path / "out.rules"
    result = runner.invoke(app, ["import-rules", str(good), "--output", str(output)])
    assert result.exit_code == 0, result.output
    assert output.read_text() == "allow with-interface 03:01:01\nblock\n"

    bad = tmp_path / "bad.rules"
    bad.write_text('allow\nallow label "x"\nallow with-interface 03:*:01\n')
    result = runner.invoke(app, ["import-rules", str(bad)])
    assert result.exit_code == 1
    assert "cannot represent" in result.output and ":2:7" in result.output
    assert "syntax error" in result.output and ":3:" in result.output


# --- fuzzing -------------------------------------------------------------------------------------

_rule_words = st.sampled_from(
    [
        "allow",
        "block",
        "reject",
        "id",
        "hash",
        "parent-hash",
        "name",
        "serial",
        "via-port",
        "with-interface",
        "with-connect-type",
        "all-of",
        "one-of",
        "none-of",
        "equals",
        "equals-ordered",
        "match-all",
        "{",
        "}",
        "if",
        "label",
        "*:*",
        "1234:*",
        "08:*:*",
        "03:01:01",
        '"x"',
        '"\\x41"',
        '"',
        "\\",
        "#",
        ":",
        "*",
    ]
)
_rule_texts = st.one_of(
    st.text(max_size=80),
    st.lists(_rule_words, max_size=12).map(" ".join),
    st.lists(st.one_of(_rule_words, st.text(max_size=5)), max_size=10).map("".join),
)


@settings(max_examples=400, deadline=None)
@given(text=_rule_texts)
def test_random_rule_texts_never_crash_the_parser(text: str) -> None:
    ruleset, problems = parse_rules(text)
    for problem in problems:
        assert isinstance(problem, RuleProblem) and problem.line >= 1 and problem.column >= 1 and problem.reason
    for rule in ruleset.rules:
        assert parse_rule(rule.to_text()) == rule


_hex4 = st.integers(0, 0xFFFF).map(lambda v: f"{v:04x}")
_byte = st.integers(0, 0xFF)
_id_patterns = st.one_of(
    st.builds(DeviceIdPattern, _hex4, _hex4),
    st.builds(DeviceIdPattern, _hex4, st.none()),
    st.just(DeviceIdPattern(None, None)),
)
_iface_patterns = st.one_of(
    st.builds(InterfacePattern, _byte, _byte, _byte),
    st.builds(InterfacePattern, _byte, _byte, st.none()),
    st.builds(InterfacePattern, _byte, st.none(), st.none()),
)
# Device strings never hold lone surrogates (the driver decodes with backslashreplace).
_strings = st.builds(StringValue, st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=12))
_operators = st.sampled_from(list(SetOperator))


@st.composite
def _conditions(draw: st.DrawFn, attribute: AttributeName) -> Condition:
    values: st.SearchStrategy[Value] = _strings
    if attribute is AttributeName.ID:
        values = _id_patterns
    elif attribute is AttributeName.WITH_INTERFACE:
        values = _iface_patterns
    return Condition(attribute, draw(_operators), tuple(draw(st.lists(values, min_size=1, max_size=4))))


@st.composite
def _rules(draw: st.DrawFn) -> Rule:
    attributes = draw(st.lists(st.sampled_from(list(AttributeName)), unique=True, max_size=5))
    return Rule(draw(st.sampled_from(list(Target))), tuple(draw(_conditions(a)) for a in attributes))


@settings(max_examples=300, deadline=None)
@given(rule=_rules())
def test_generated_rules_round_trip(rule: Rule) -> None:
    assert parse_rule(rule.to_text()) == rule
    assert RuleSet((rule,)).to_text() == rule.to_text() + "\n"
