"""Import a USBGuard rules file into the subset sekisho can enforce, reporting what it cannot."""

from __future__ import annotations

from dataclasses import dataclass

from sekisho.agents.usb.rules.model import AttributeName, Rule, Target
from sekisho.agents.usb.rules.parser import RuleProblem, parse_rules
from sekisho.agents.usb.rules.ruleset import RuleSet


@dataclass(frozen=True, slots=True)
class ImportReport:
    """Rules imported, lines that could not be represented, and advice about rules that were."""

    rules: RuleSet
    problems: tuple[RuleProblem, ...]
    warnings: tuple[RuleProblem, ...] = ()

    @property
    def ok(self) -> bool:
        """Return whether every rule in the file was represented."""
        return not self.problems


def import_rules(text: str, *, default_target: Target = Target.BLOCK) -> ImportReport:
    """Parse USBGuard rules text; every rule that cannot be represented becomes a problem."""
    ruleset, problems = parse_rules(text, default_target=default_target)
    warnings = tuple(
        RuleProblem(
            line,
            1,
            f"{attribute} values from USBGuard may differ from sekisho's device hash; "
            "re-pin them from a sekisho reading of the device",
            "unsupported",
            rule.to_text(),
        )
        for rule, line in zip(ruleset.rules, ruleset.source_lines, strict=True)
        for attribute in _hash_attributes(rule)
    )
    return ImportReport(ruleset, problems, warnings)


def _hash_attributes(rule: Rule) -> list[AttributeName]:
    return [c.attribute for c in rule.conditions if c.attribute in (AttributeName.HASH, AttributeName.PARENT_HASH)]
