"""USBGuard's rule language: corpora, matching on fake sysfs devices, default policy, importer, fuzzing.

The same parser and matcher are checked against the real usbguard 1.1.2 in tests/test_usb_usbguard.py.
"""

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
from sekisho.drivers.usb.descriptors import build_descriptors
from sekisho.drivers.usb.fake import FakeSysfsTree

DATA = Path(__file__).parent / "data" / "usb"
SERIAL = "4C530001234567891234"


def _corpus(name: str) -> list[tuple[int, str]]:
    lines = (DATA / name).read_text(encoding="utf-8").split("\n")
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
    text = 'allow\nallow if true\nblock label "x"\nallow with-port "1"\nmatch id 1234:5678\ndevice\n'
    _, problems = parse_rules(text)
    assert [(p.line, p.column, p.kind) for p in problems] == [
        (2, 7, "unsupported"),
        (3, 7, "unsupported"),
        (4, 7, "syntax"),  # USBGuard has no with-port attribute either
        (5, 1, "unsupported"),
        (6, 1, "unsupported"),
    ]
    assert "cannot be represented" in problems[0].reason


def test_positional_and_explicit_id_are_the_same_rule() -> None:
    assert parse_rule("allow 046d:c52b") == parse_rule("allow id 046d:c52b")
    assert parse_rule("allow with-interface { 03:01:01 }") == parse_rule("allow with-interface 03:01:01")


# --- issue 15: what USBGuard does, sekisho does ----------------------------------------------------


@pytest.mark.parametrize(
    "separator",
    ["\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\r", "\x1c", "\x1d", "\x1e"],
    ids=["LS", "PS", "NEL", "VT", "FF", "CR", "FS", "GS", "RS"],
)
def test_only_newline_ends_a_rule_so_no_allow_all_is_smuggled_in(separator: str) -> None:
    # Issue 15: `block id 1234:5678` + U+2028 (or NEL, VT, a lone CR, …) + `allow` imported as two
    # rules, one a bare allow, exit 0 (str.splitlines). USBGuard reads one line and refuses it.
    text = f"block id 1234:5678{separator}allow\n"
    ruleset, problems = parse_rules(text)
    assert len(ruleset) == 0
    assert [(p.line, p.column, p.kind) for p in problems] == [(1, 19, "syntax")]
    report = import_rules(text)
    assert not report.ok and len(report.problems) == 1


def test_rules_file_with_a_separator_is_refused_by_the_cli(tmp_path: Path) -> None:
    rules = tmp_path / "rules.conf"
    rules.write_bytes("block id 1234:5678\u2028allow\n".encode())
    output = tmp_path / "out.rules"
    result = CliRunner().invoke(app, ["import-rules", str(rules), "--output", str(output)])
    assert result.exit_code == 1, result.output
    assert f"{rules}:1:19" in result.output and "\\u2028" in result.output
    assert not output.exists(), "nothing is written when a line is refused"


def test_ids_are_case_sensitive_as_in_usbguard(devices: dict[str, UsbDevice]) -> None:
    # Issue 15: sekisho lower-cased ids and allowed; USBGuard compares the strings, and the kernel writes
    # lowercase hex, so an uppercase id matches no device (220 of the 767 rules of USBGuard's corpus).
    keyboard = devices["1-1.3"]  # 046d:c31c
    assert _matches("allow id 046d:c31c", keyboard)
    assert not _matches("allow id 046D:C31C", keyboard)
    assert not _matches("allow id 046D:*", keyboard)
    assert _matches("allow id none-of { 046D:* }", keyboard)
    assert parse_rule("allow 046D:C52B") != parse_rule("allow id 046d:c52b")
    assert parse_rule("allow 046D:C52B").to_text() == "allow id 046D:C52B"
    report = import_rules("block id 046D:C31C\n")
    assert report.ok and "matches no device" in report.warnings[0].reason


def test_an_interface_declared_twice_counts_twice(tmp_path: Path) -> None:
    # Issue 15: a stick whose interface 0 has two alternate settings was one interface here, two in
    # USBGuard, so `equals { 08:*:* }` allowed what the daemon blocks.
    tree = FakeSysfsTree(tmp_path)
    tree.add_root_hub(1)
    descriptors = build_descriptors(
        vendor_id=0x0781, product_id=0x5581, interfaces=((8, 6, 0x50),), alternates=((0, 8, 6, 0x62),)
    )
    tree.add_device("1-2", 0x0781, 0x5581, SERIAL, interfaces=[(8, 6, 0x50)], descriptors=descriptors)
    stick = SysfsUsb(tree.root).read_device("1-2")
    assert stick.rule_interfaces == ((8, 6, 0x50), (8, 6, 0x62))
    assert not _matches("allow with-interface equals { 08:*:* }", stick)
    assert _matches("allow with-interface equals { 08:*:* 08:*:* }", stick)
    assert _matches("allow with-interface equals-ordered { 08:06:50 08:06:62 }", stick)
    assert _matches("allow with-interface match-all { 08:06:* }", stick)


def test_missing_connect_type_matches_the_empty_string(devices: dict[str, UsbDevice]) -> None:
    # Issue 15: "unknown" here, "" in USBGuard.
    assert _matches('allow with-connect-type ""', devices["usb1"])
    assert not _matches('allow with-connect-type "unknown"', devices["usb1"])


@pytest.mark.parametrize(
    "line",
    [
        'allow name "a\\nb"',
        'allow name "a\\tb"',
        'allow name "a\\\'b"',
        'allow name "\\0"',
        'allow name "\\101"',
        'allow name"x"',
        "allow with-interface{ 08:*:* }",
        "allow with-interface equals{ 08:*:* }",
        "allow\u3000id 1234:5678",
        "allow\xa0id 1234:5678",
        "allow\x0bid 1234:5678",
        "allow\x0cid 1234:5678",
        "allow id 1234:5678\r",
        "allow\r",
        "   allow",
        "allow   ",
        "   ",
        "\ufeffallow",
        'allow name "carriage \r return"',
    ],
    ids=[
        "escape-n",
        "escape-t",
        "escape-quote",
        "escape-0",
        "escape-decimal",
        "no-blank-after-name",
        "no-blank-before-brace",
        "no-blank-after-operator",
        "ideographic-space",
        "nbsp",
        "vertical-tab",
        "form-feed",
        "trailing-cr",
        "target-cr",
        "leading-blanks",
        "trailing-blanks",
        "blank-line",
        "bom",
        "cr-in-string",
    ],
)
def test_inputs_usbguard_refuses_are_refused(line: str) -> None:
    # Issue 15: each of these imported; usbguard-rule-parser refuses every one (tests/test_usb_usbguard.py).
    with pytest.raises(RuleSyntaxError) as caught:
        parse_rule(line)
    assert caught.value.problem.kind == "syntax" and caught.value.problem.reason


def test_a_target_glued_to_a_rule_is_refused() -> None:
    # USBGuard reads `block id 1234:5678allow` as ONE rule, `allow id 1234:5678`: refused here.
    for line in ("block id 1234:5678allow", "allowblock", 'block name "x"allow'):
        with pytest.raises(RuleSyntaxError, match="directly after the rule") as caught:
            parse_rule(line)
        assert caught.value.problem.kind == "unsupported"


def test_string_match_all_always_holds_and_wildcard_id_match_all_never_does(devices: dict[str, UsbDevice]) -> None:
    # usbguard 1.1.2's Predicates::isSupersetOf: not implemented for strings (true), identity for ids.
    stick = devices["1-2"]
    assert _matches('allow name match-all { "no such name" }', stick)
    assert _matches('allow serial match-all { "x" }', stick)
    assert not _matches("allow id match-all { 0781:* }", stick)
    assert not _matches("allow id match-all { *:* }", stick)
    assert _matches("allow id match-all { 0781:5581 }", stick)
    advice = " ".join(
        w.reason for w in import_rules('block name match-all { "x" }\nallow id match-all { 0781:* }\n').warnings
    )
    assert "matches every device" in advice and "match nothing" in advice


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


def test_equals_counts_as_usbguard_counts(devices: dict[str, UsbDevice]) -> None:
    # USBGuard's equals: same count, every rule value matching some device value — so overlapping
    # patterns let a second interface through unmatched. The guard still rejects storage + HID first,
    # and the importer refuses this allow rule (it can admit storage) and warns about the overlap.
    badusb = devices["1-3"]  # 08:06:50 03:01:01
    assert _matches("allow with-interface equals { 08:*:* 08:06:* }", badusb)
    assert (
        decide_device(badusb, parse_rules("allow with-interface equals { 08:*:* 08:06:* }").ruleset).target
        is Target.REJECT
    )
    report = import_rules("allow with-interface equals { 0e:*:* 0e:01:* }\n")
    assert not report.ok and report.problems[0].kind == "mass_storage"
    assert "overlapping" in report.warnings[0].reason


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


def test_import_reports_unrepresentable_rules() -> None:
    text = (DATA / "rules.good").read_text() + "allow if random\n"
    report = import_rules(text, allow_mass_storage_outside_register=True)
    assert not report.ok and [p.kind for p in report.problems] == ["unsupported"]
    assert report.problems[0].line == len(text.split("\n")) - 1
    assert len(report.rules) == len(GOOD)


def test_imported_hash_rules_are_taken_without_a_may_differ_warning(devices: dict[str, UsbDevice]) -> None:
    # Issue 15: hash/parent-hash rules never matched (sekisho's hash left out the product name) and the
    # importer only warned that they "may differ". The hashes are USBGuard's now (checked against the
    # daemon in tests/test_usb_usbguard.py); a rule copied from `usbguard generate-policy` matches.
    stick, hub = devices["1-2"], devices["usb1"]
    rule = f'reject id 0781:5581 hash "{stick.device_hash}" parent-hash "{hub.device_hash}" with-interface 08:06:50'
    report = import_rules(rule + "\n")
    assert report.ok and report.warnings == ()
    assert report.rules.decide(stick).target is Target.REJECT
    assert stick.device_hash == "YtVAMyRN4QfZmKsej07FjGOzZN4MUXqdTBPg1ZYnhV0="  # as usbguard-daemon printed it


@pytest.mark.parametrize(
    ("rule", "refused"),
    [
        ("allow with-interface equals { 08:*:* }", True),  # usbguard-rules.conf(5), example 1
        ("allow", True),
        ("allow *:*", True),
        ("allow id 0781:5581", True),  # no with-interface: a stick with that id would pass
        ("allow with-interface one-of { 08:06:50 09:00:* }", True),
        ("allow with-interface all-of { 09:00:* }", True),
        ("allow with-interface none-of { 08:06:* }", True),
        ("allow with-interface match-all { 08:*:* 03:*:* }", True),
        ("allow with-interface equals { 09:*:* 09:00:* }", True),  # overlap frees a place for 08
        ("allow with-interface equals-ordered { 09:00:* 08:*:* }", True),
        ("allow with-interface one-of { 03:00:01 03:01:01 }", False),  # storage + HID is rejected as BadUSB
        ("allow with-interface all-of { 03:01:01 }", False),
        ("allow with-interface none-of { 08:*:* }", False),
        ("allow with-interface match-all { 09:*:* 03:01:01 03:01:02 03:00:* }", False),
        ("allow with-interface equals { 09:00:* 0e:*:* }", False),
        ("allow with-interface equals-ordered { 09:00:* }", False),
        ("block with-interface equals { 08:*:* }", False),
        ("reject", False),
    ],
)
def test_allow_rules_that_can_admit_mass_storage_are_refused_on_import(rule: str, refused: bool) -> None:
    report = import_rules(f"# site rules\n{rule}\n")
    assert report.ok is not refused
    if refused:
        problem = report.problems[0]
        assert (problem.line, problem.kind) == (2, "mass_storage")
        assert "media register" in problem.reason and "--allow-mass-storage-outside-register" in problem.reason
        forced = import_rules(f"{rule}\n", allow_mass_storage_outside_register=True)
        assert forced.ok and forced.warnings[0].kind == "mass_storage"


def test_cli_refuses_mass_storage_allow_unless_overridden(tmp_path: Path) -> None:
    rules = tmp_path / "rules.conf"
    rules.write_text("allow with-interface equals { 03:*:* }\nallow with-interface equals { 08:*:* }\n")
    output = tmp_path / "out.rules"
    runner = CliRunner()
    result = runner.invoke(app, ["import-rules", str(rules), "--output", str(output)])
    assert result.exit_code == 1
    assert f"refused {rules}:2:1" in result.output and "'allow with-interface 08:*:*'" in result.output
    assert not output.exists()
    result = runner.invoke(
        app, ["import-rules", str(rules), "--output", str(output), "--allow-mass-storage-outside-register"]
    )
    assert result.exit_code == 0, result.output
    assert f"warning {rules}:2:" in result.output
    assert output.read_text() == "allow with-interface 03:*:*\nallow with-interface 08:*:*\n"


def test_cli_import_rules(tmp_path: Path) -> None:
    runner = CliRunner()
    good = tmp_path / "good.rules"
    good.write_text("allow with-interface 03:01:01\nblock\n")
    output = tmp_path / "out.rules"
    result = runner.invoke(app, ["import-rules", str(good), "--output", str(output)])
    assert result.exit_code == 0, result.output
    assert output.read_text() == "allow with-interface 03:01:01\nblock\n"

    bad = tmp_path / "bad.rules"
    bad.write_text('block\nallow label "x"\nallow with-interface 03:*:01\n')
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
