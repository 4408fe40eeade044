"""Import a USBGuard rules file into the rules sekisho enforces, reporting what it cannot take.

Three kinds of problem make an import fail (``ImportReport.ok`` false, ``sekisho usb import-rules``
exits 1, nothing is written):

- ``syntax``: a line usbguard 1.1.2 itself refuses (``parser``);
- ``unsupported``: a line USBGuard accepts that sekisho cannot enforce (``if``, ``label``, …);
- ``mass_storage``: an ``allow`` rule that could let a mass-storage device (an interface of class
  ``08``) in. On a My Number terminal only the media register (a registered medium, lent to the
  person logged in, for this terminal, now) lets USB storage in; the guard blocks any other storage
  device whatever the admin rules say (``agents.usb.guard``), so such a rule would not do what it
  says. With ``allow_mass_storage_outside_register=True`` (the CLI's
  ``--allow-mass-storage-outside-register``) the rule is imported and reported as a warning instead —
  it still does not outrank the register.

Warnings (the import still succeeds) point at rules that behave in USBGuard, and therefore here, other
than they read: ids in uppercase hex (match nothing), ``match-all`` on a string attribute (matches
everything) or on a wildcard id (matches nothing), ``equals`` with overlapping interface patterns.
"""

from __future__ import annotations

from dataclasses import dataclass

from sekisho.agents.usb.rules.model import (
    STRING_ATTRIBUTES,
    AttributeName,
    Condition,
    DeviceIdPattern,
    InterfacePattern,
    Rule,
    SetOperator,
    Target,
)
from sekisho.agents.usb.rules.parser import RuleProblem, parse_rules
from sekisho.agents.usb.rules.ruleset import RuleSet

MASS_STORAGE_CLASS = 0x08
HID_CLASS = 0x03
ALLOW_MASS_STORAGE_FLAG = "--allow-mass-storage-outside-register"


@dataclass(frozen=True, slots=True)
class ImportReport:
    """Rules imported, lines refused (with line and reason), and advice about rules that were taken."""

    rules: RuleSet
    problems: tuple[RuleProblem, ...]
    warnings: tuple[RuleProblem, ...] = ()

    @property
    def ok(self) -> bool:
        """Return whether every rule in the file was taken."""
        return not self.problems


def import_rules(
    text: str, *, default_target: Target = Target.BLOCK, allow_mass_storage_outside_register: bool = False
) -> ImportReport:
    """Parse USBGuard rules text; refuse what USBGuard refuses, what sekisho cannot enforce, storage allows."""
    ruleset, problems = parse_rules(text, default_target=default_target)
    refused: list[RuleProblem] = list(problems)
    warnings: list[RuleProblem] = []
    for rule, line in zip(ruleset.rules, ruleset.source_lines, strict=True):
        if may_allow_mass_storage(rule):
            reason = (
                f"'{rule.to_text()}' can allow USB mass storage (class 08) that is not in the media register; "
                "on My Number terminals the media register outranks admin allow rules, so the guard blocks such "
                "a device anyway"
            )
            if allow_mass_storage_outside_register:
                warnings.append(RuleProblem(line, 1, f"{reason} (imported: {ALLOW_MASS_STORAGE_FLAG})", "mass_storage"))
            else:
                refused.append(
                    RuleProblem(
                        line,
                        1,
                        f"{reason}; restrict its with-interface, remove it, or pass {ALLOW_MASS_STORAGE_FLAG}",
                        "mass_storage",
                        rule.to_text(),
                    )
                )
        warnings.extend(RuleProblem(line, 1, advice, "advice", rule.to_text()) for advice in _advice(rule))
    refused.sort(key=lambda problem: problem.line)
    return ImportReport(ruleset, tuple(refused), tuple(warnings))


def may_allow_mass_storage(rule: Rule) -> bool:
    """Return whether an allow rule can match a device with a class-08 interface that the guard would judge.

    Only ``with-interface`` is analysed (any other attribute can be met by some device). A device with
    both a storage and a HID interface never reaches the rules (it is rejected as BadUSB), so a
    condition that needs a class-03 interface cannot let storage in.
    """
    if rule.target is not Target.ALLOW:
        return False
    condition = rule.condition(AttributeName.WITH_INTERFACE)
    if condition is None:
        return True
    return _interfaces_admit_storage(condition)


def _interfaces_admit_storage(condition: Condition) -> bool:
    """Is there an interface list with a class-08 and no class-03 interface that the condition accepts?"""
    patterns = [v for v in condition.values if isinstance(v, InterfacePattern)]
    needs_hid = any(p.cls == HID_CLASS for p in patterns)
    names_storage = any(p.cls == MASS_STORAGE_CLASS for p in patterns)
    operator = condition.operator
    if operator is SetOperator.ONE_OF:
        # Some pattern matches some interface; add a storage interface beside it.
        return any(p.cls != HID_CLASS for p in patterns)
    if operator is SetOperator.ALL_OF:
        # Every pattern matches some interface; a storage interface can sit beside them.
        return not needs_hid
    if operator is SetOperator.NONE_OF:
        return not _covers_all_storage(patterns)
    if operator is SetOperator.EQUALS_ORDERED:
        return names_storage and not needs_hid
    if operator is SetOperator.MATCH_ALL:
        # Every device interface matches some pattern: storage only if a pattern is storage.
        return names_storage
    # EQUALS: as many interfaces as patterns, each pattern matching one of them. A storage interface
    # fits if a pattern asks for it, or if two patterns can share one interface and free a place.
    if needs_hid:
        return False
    if names_storage:
        return True
    return any(a.overlaps(b) for index, a in enumerate(patterns) for b in patterns[index + 1 :])


def _covers_all_storage(patterns: list[InterfacePattern]) -> bool:
    """Return whether the patterns together match every 08:ss:pp triple."""
    storage = [p for p in patterns if p.cls == MASS_STORAGE_CLASS]
    if any(p.subclass is None for p in storage):
        return True
    whole = {p.subclass for p in storage if p.protocol is None}
    for subclass in range(256):
        if subclass in whole:
            continue
        protocols = {p.protocol for p in storage if p.subclass == subclass}
        if len(protocols) < 256:
            return False
    return True


def _advice(rule: Rule) -> list[str]:
    advice: list[str] = []
    for condition in rule.conditions:
        if condition.attribute is AttributeName.ID:
            ids = [v for v in condition.values if isinstance(v, DeviceIdPattern)]
            if any(not v.lowercase for v in ids):
                advice.append(
                    "ids are compared case-sensitively (as in USBGuard) and the kernel reports lowercase hex: "
                    f"{' '.join(v.to_text() for v in ids if not v.lowercase)} matches no device"
                )
            if condition.operator is SetOperator.MATCH_ALL and any(None in (v.vendor, v.product) for v in ids):
                advice.append("USBGuard's match-all on id matches only identical ids: wildcard ids in it match nothing")
        if condition.operator is SetOperator.MATCH_ALL and condition.attribute in STRING_ATTRIBUTES:
            advice.append(
                f"USBGuard's match-all on {condition.attribute} always holds (not implemented for strings): "
                "this condition matches every device"
            )
        if condition.attribute is AttributeName.WITH_INTERFACE and condition.operator is SetOperator.EQUALS:
            patterns = [v for v in condition.values if isinstance(v, InterfacePattern)]
            if any(a.overlaps(b) for index, a in enumerate(patterns) for b in patterns[index + 1 :]):
                advice.append(
                    "with-interface equals compares counts: with overlapping patterns a device interface "
                    "need not match any of them"
                )
    return advice
