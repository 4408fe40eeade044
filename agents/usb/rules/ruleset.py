"""An ordered rule set and its first-match decision."""

from __future__ import annotations

from dataclasses import dataclass

from sekisho.agents.usb.rules.model import Rule, Target
from sekisho.drivers.usb.model import UsbDevice

DEFAULT_RULE = "default"


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with a device and why: the matching rule's index and text, or ``default``."""

    target: Target
    rule_index: int | None
    rule_text: str
    reason: str

    @property
    def allowed(self) -> bool:
        """Return whether the device may be authorised."""
        return self.target is Target.ALLOW


@dataclass(frozen=True, slots=True)
class RuleSet:
    """Rules evaluated in order; the first that matches decides, else the implicit default target."""

    rules: tuple[Rule, ...] = ()
    default_target: Target = Target.BLOCK
    # 1-based line numbers of the rules in their source file, when parsed from one; for messages only.
    source_lines: tuple[int, ...] = ()

    def decide(self, device: UsbDevice) -> Decision:
        """Return the first matching rule's decision, or the default target's."""
        for index, rule in enumerate(self.rules):
            if rule.matches(device):
                text = rule.to_text()
                where = f"line {self.source_lines[index]}" if index < len(self.source_lines) else f"rule {index}"
                return Decision(rule.target, index, text, f"matched {where}: {text}")
        return Decision(self.default_target, None, DEFAULT_RULE, f"no rule matched: default {self.default_target}")

    def to_text(self) -> str:
        """Return the rules, one per line, in the rule language."""
        return "".join(rule.to_text() + "\n" for rule in self.rules)

    def __len__(self) -> int:
        return len(self.rules)
