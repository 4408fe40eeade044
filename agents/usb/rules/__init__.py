"""USB rules in USBGuard's rule language (usbguard 1.1.2): parse, match, decide, import."""

from sekisho.agents.usb.rules.importer import ImportReport, import_rules, may_allow_mass_storage
from sekisho.agents.usb.rules.model import (
    AttributeName,
    Condition,
    DeviceIdPattern,
    InterfacePattern,
    Rule,
    SetOperator,
    StringValue,
    Target,
)
from sekisho.agents.usb.rules.parser import (
    ParsedRules,
    RuleProblem,
    RuleSyntaxError,
    parse_rule,
    parse_rules,
    read_rules_text,
)
from sekisho.agents.usb.rules.policy import DEFAULT_POLICY_TEXT, decide_device, decide_unreadable, default_ruleset
from sekisho.agents.usb.rules.ruleset import Decision, RuleSet

__all__ = [
    "DEFAULT_POLICY_TEXT",
    "AttributeName",
    "Condition",
    "Decision",
    "DeviceIdPattern",
    "ImportReport",
    "InterfacePattern",
    "ParsedRules",
    "Rule",
    "RuleProblem",
    "RuleSet",
    "RuleSyntaxError",
    "SetOperator",
    "StringValue",
    "Target",
    "decide_device",
    "decide_unreadable",
    "default_ruleset",
    "import_rules",
    "may_allow_mass_storage",
    "parse_rule",
    "parse_rules",
    "read_rules_text",
]
