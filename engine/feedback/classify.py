"""SMTP reply -> category: a data-driven classifier.

Why data: mail operators learn new provider wordings every week; they must be
able to add a regex in a TOML file (or a local override file) without touching
code, in the spirit of KumoMTA's ``bounce_classifier/iana.toml``. The shipped
rules live in ``engine/feedback/rules/*.toml``; each file has a ``priority``
(lower is tried first) and a list of ``[[rule]]`` tables::

    priority = 100
    [[rule]]
    name = "gmail.disabled"              # reported back as Classification.rule
    category = "mailbox_disabled"
    text = ["account that you tried to reach is (disabled|inactive)"]   # any matches
    enhanced = ["x.2.1"]                 # optional: x = any class, ? = one digit, * = digits
    code = [550, 552]                    # optional: basic reply codes
    permanent = true                     # optional: used only when no code says it

All given conditions must hold. Rules are tried in order (override files
first, then by priority, then file order) and the first match wins: provider
wording first, generic wording next, bare RFC 3463 / RFC 5321 codes last.

Permanence comes from the reply itself (5xx / 5.x.x permanent, 4xx / 4.x.x
temporary, 2xx success); only when the reply carries no code does the rule's
or the category's default decide.
"""

from __future__ import annotations

import functools
import re
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from engine.errors import ConfigError

#: Every category a rule may name. ``complaint`` and ``auto_reply`` are only
#: produced by the report parser, ``delivered`` by 2xx replies / DSN action=delivered.
CATEGORIES: dict[str, bool] = {
    # category: permanent when the reply carries no code
    "unknown_user": True,
    "mailbox_full": False,
    "mailbox_disabled": True,
    "bad_domain": True,
    "rate_limited": False,
    "reputation_block": False,
    "auth_failure": True,
    "content_spam": True,
    "policy": True,
    "message_too_big": True,
    "protocol_error": True,
    "network_error": False,
    "expired": True,
    "transient_other": False,
    "permanent_other": True,
    "delivered": False,
    "complaint": False,
    "auto_reply": False,
}

#: Categories that mean "this address cannot receive mail": suppress it.
#: Deliberately narrow (like Sisimai's hard bounces): a full or disabled
#: mailbox, a block or a policy rejection says nothing final about the address.
HARD_CATEGORIES = frozenset({"unknown_user", "bad_domain"})

MAX_TEXT = 4096  # longer replies are cut: the signal is at the start, and regex time must stay bounded


@dataclass(frozen=True, slots=True)
class Classification:
    """What a reply means. ``rule`` names the rule that matched (or ``default:...``)."""

    category: str
    permanent: bool
    rule: str

    @property
    def hard(self) -> bool:
        """A hard bounce: the address itself is bad, so it should be suppressed."""
        return self.permanent and self.category in HARD_CATEGORIES


# --------------------------------------------------------------------------- reply parsing

_LINE_RE = re.compile(r"^\s*([1-5]\d\d)(?:([ -])|$)\s*(?:([1-5])\.(\d{1,3})\.(\d{1,3})(?![\d.]\d)\b)?\s*(.*)$", re.S)
_ENH_ANY_RE = re.compile(r"(?<![\d.])#?([245])\.(\d{1,3})\.(\d{1,3})(?!\.?\d)")
_CODE_ENH_RE = re.compile(r"(?<![\w.])([245]\d\d)[\s:-]{1,3}['\"]?(?:#?([245]\.\d{1,3}\.\d{1,3})(?!\.?\d))")
_CODE_ANY_RE = re.compile(r"(?<![\w.:/\[#-])([45][0-5]\d)(?=[ :-]{1,3}[\w\"'(<\[#]|$)")
_WS_RE = re.compile(r"\s+")
_PAIR_RE = re.compile(r"(?<![\w.])[245]\d\d[ -]#?[245]\.\d{1,3}\.\d{1,3}(?![\d.]\d)\s?")


def _norm_enhanced(cls: str, subj: str, detail: str) -> str:
    return f"{cls}.{int(subj)}.{int(detail)}"


def parse_reply(text: str) -> tuple[int | None, str | None, str]:
    """Split an SMTP reply into (basic code, enhanced code, text).

    Handles multi-line replies (``550-5.1.1 ...\\r\\n550 5.1.1 ...``): each line's
    code prefix is removed and the texts are joined with spaces. When the text
    does not start with a code (a bounce's diagnostic like ``host x said: 550
    5.1.1 ...`` or qmail's ``(#5.1.1)``), the first code found inside is used.
    """
    if not isinstance(text, str):
        text = str(text or "")
    text = text[: MAX_TEXT * 4]
    lines = [ln for ln in re.split(r"\r?\n|\r", text) if ln.strip()]
    code: int | None = None
    enhanced: str | None = None
    parts: list[str] = []
    strict = bool(lines)
    for ln in lines:
        m = _LINE_RE.match(ln)
        if not m:
            strict = False
            break
        if code is None:
            code = int(m.group(1))
            if m.group(3):
                enhanced = _norm_enhanced(m.group(3), m.group(4), m.group(5))
        parts.append(m.group(6).strip())
    if strict:
        return code, enhanced, _WS_RE.sub(" ", " ".join(p for p in parts if p)).strip()
    flat = _WS_RE.sub(" ", text).strip()
    code, enhanced = find_codes(flat)
    return code, enhanced, flat


def find_codes(text: str) -> tuple[int | None, str | None]:
    """Best-effort (basic, enhanced) codes found anywhere in free text."""
    code: int | None = None
    enhanced: str | None = None
    m = _CODE_ENH_RE.search(text)
    if m:
        code = int(m.group(1))
        c, s, d = m.group(2).split(".")
        return code, _norm_enhanced(c, s, d)
    m = _ENH_ANY_RE.search(text)
    if m:
        enhanced = _norm_enhanced(m.group(1), m.group(2), m.group(3))
    m = _CODE_ANY_RE.search(text)
    if m:
        code = int(m.group(1))
    if code is not None and enhanced is not None and str(code)[0] != enhanced[0]:
        # "550 ... (#4.4.1)": trust the basic code's class, keep the enhanced detail
        pass
    return code, enhanced


# --------------------------------------------------------------------------- rules


def _enhanced_pattern(pat: str) -> re.Pattern[str]:
    """``x.1.1`` / ``5.7.6??`` / ``4.7.*`` -> a compiled full-match regex."""
    parts = pat.strip().split(".")
    if len(parts) != 3:
        raise ValueError(f"enhanced code pattern {pat!r} must look like 'x.1.1' or '5.7.*'")
    out = []
    for i, p in enumerate(parts):
        if p in ("x", "X", "*"):
            out.append(r"[245]" if i == 0 else r"\d+")
            continue
        if not re.fullmatch(r"[\d?*]+", p):
            raise ValueError(f"enhanced code pattern {pat!r}: bad part {p!r}")
        out.append(p.replace("?", r"\d").replace("*", r"\d*"))
    return re.compile(r"\.".join(out))


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    category: str
    text: tuple[re.Pattern[str], ...]
    enhanced: tuple[re.Pattern[str], ...]
    codes: frozenset[int]
    permanent: bool | None
    source: str

    def matches(self, code: int | None, enhanced: str | None, text: str) -> bool:
        """``text`` must already be lower-cased (patterns are compiled lower-case, see :func:`_lower_pattern`)."""
        if self.codes and code not in self.codes:
            return False
        if self.enhanced:
            if enhanced is None or not any(p.fullmatch(enhanced) for p in self.enhanced):
                return False
        if self.text and not any(p.search(text) for p in self.text):
            return False
        return True


def _as_list(value: Any, what: str, where: str) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (str, int)):
        return [value]
    if isinstance(value, list):
        return value
    raise ConfigError(f"{where}: '{what}' must be a string/number or a list of them")


def _compile_rule(raw: dict[str, Any], where: str) -> Rule:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: each [[rule]] must be a table")
    unknown = set(raw) - {"name", "category", "text", "enhanced", "code", "permanent", "comment"}
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: name, category, text, enhanced, code, permanent")
    category = raw.get("category")
    if category not in CATEGORIES:
        raise ConfigError(f"{where}: category {category!r} is not one of {sorted(CATEGORIES)}")
    name = str(raw.get("name") or f"{where}:{category}")
    texts = [str(t) for t in _as_list(raw.get("text"), "text", where)]
    try:
        text_re = tuple(re.compile(_lower_pattern(t)) for t in texts)
    except re.error as exc:
        raise ConfigError(f"{where} (rule {name}): bad regex in 'text': {exc}") from exc
    try:
        enh = tuple(_enhanced_pattern(str(p)) for p in _as_list(raw.get("enhanced"), "enhanced", where))
    except ValueError as exc:
        raise ConfigError(f"{where} (rule {name}): {exc}") from exc
    try:
        codes = frozenset(int(c) for c in _as_list(raw.get("code"), "code", where))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where} (rule {name}): 'code' must be integers like 550") from exc
    if not text_re and not enh and not codes:
        raise ConfigError(f"{where} (rule {name}): needs at least one of text, enhanced, code")
    perm = raw.get("permanent")
    if perm is not None and not isinstance(perm, bool):
        raise ConfigError(f"{where} (rule {name}): 'permanent' must be true or false")
    return Rule(name, category, text_re, enh, codes, perm, where)


def _lower_pattern(pattern: str) -> str:
    """Lower-case a regex's literals but not its escapes (``\\S``, ``\\D``, ``\\W`` keep their meaning).

    Matching case-sensitively against lower-cased text is several times faster
    than ``re.IGNORECASE``, and each pattern compiled on its own keeps its
    literal prefix, which ``re`` searches for quickly: this is what makes the
    classifier do thousands of replies per second.
    """
    out: list[str] = []
    i = 0
    while i < len(pattern):
        if pattern[i] == "\\" and i + 1 < len(pattern):
            out.append(pattern[i : i + 2])
            i += 2
            continue
        out.append(pattern[i].lower())
        i += 1
    return "".join(out)


def _load_file(path: Path | str, data: bytes | None = None) -> tuple[int, list[Rule]]:
    where = str(path)
    try:
        doc = tomllib.loads((data if data is not None else Path(path).read_bytes()).decode("utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read classifier rules {where}: {exc.strerror or exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"classifier rules {where} are not valid TOML: {exc}") from exc
    priority = doc.get("priority", 500)
    if not isinstance(priority, int):
        raise ConfigError(f"{where}: 'priority' must be an integer")
    rules = [_compile_rule(r, f"{where}[rule {i}]") for i, r in enumerate(_as_list(doc.get("rule"), "rule", where))]
    return priority, rules


def _builtin_files() -> list[tuple[str, bytes]]:
    base = resources.files("engine.feedback") / "rules"
    out = []
    for entry in sorted(base.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".toml"):
            out.append((f"builtin:{entry.name}", entry.read_bytes()))
    return out


class Classifier:
    """An ordered, compiled rule set. Build once, call :meth:`classify` many times."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules: tuple[Rule, ...] = tuple(rules)
        self._cached = functools.lru_cache(maxsize=8192)(self._classify)

    def classify(self, code: int | None, enhanced: str | None, text: str | None) -> Classification:
        """Classify one reply given its parts (any may be missing)."""
        if code is not None and not isinstance(code, int):
            try:
                code = int(code)
            except (TypeError, ValueError):
                code = None
        if code is not None and not 100 <= code <= 599:
            code = None
        if enhanced is not None:
            m = _ENH_ANY_RE.fullmatch(enhanced.strip().lstrip("#")) if isinstance(enhanced, str) else None
            enhanced = _norm_enhanced(m.group(1), m.group(2), m.group(3)) if m else None
        # codes repeated inside joined multi-line replies ("... multiple 550 5.7.1 addresses ...") break phrases apart
        text = _WS_RE.sub(" ", _PAIR_RE.sub(" ", text[: MAX_TEXT * 2]))[:MAX_TEXT].lower().strip() if text else ""
        return self._cached(code, enhanced, text)

    def classify_reply(self, reply: str) -> Classification:
        """Classify a raw SMTP reply (multi-line allowed)."""
        return self.classify(*parse_reply(reply))

    def _classify(self, code: int | None, enhanced: str | None, text: str) -> Classification:
        permanent = _permanence(code, enhanced)
        if code is not None and 200 <= code < 300 or (code is None and enhanced and enhanced[0] == "2"):
            return Classification("delivered", False, "default:2xx")
        for rule in self.rules:
            if rule.matches(code, enhanced, text):
                if permanent is None:
                    permanent = rule.permanent if rule.permanent is not None else CATEGORIES[rule.category]
                category = rule.category
                if category == "transient_other" and permanent:
                    category = "permanent_other"
                elif category == "permanent_other" and not permanent:
                    category = "transient_other"
                return Classification(category, permanent, rule.name)
        if permanent:
            return Classification("permanent_other", True, "default:permanent")
        return Classification("transient_other", False, "default:transient" if permanent is False else "default:unknown")


def _permanence(code: int | None, enhanced: str | None) -> bool | None:
    """5 = permanent, 4 = temporary; the basic code wins over the enhanced one (it is what the server acts on)."""
    if code is not None:
        first = code // 100
        if first == 5:
            return True
        if first == 4:
            return False
        if first == 2:
            return False
    if enhanced:
        if enhanced[0] == "5":
            return True
        if enhanced[0] == "4":
            return False
        if enhanced[0] == "2":
            return False
    return None


def load_rules(extra_paths: Iterable[str | Path] = ()) -> Classifier:
    """Compile the built-in rules plus local override files (which take precedence).

    Raises :class:`ConfigError` naming the file and rule when a rule is invalid,
    so a typo in an override file stops the engine at start-up, not at 3 a.m.
    """
    override: list[Rule] = []
    for path in extra_paths:
        _, rules = _load_file(path)
        override.extend(rules)
    builtin: list[tuple[int, int, Rule]] = []
    for i, (name, data) in enumerate(_builtin_files()):
        prio, rules = _load_file(name, data)
        builtin.extend((prio, i * 100000 + j, r) for j, r in enumerate(rules))
    builtin.sort(key=lambda t: (t[0], t[1]))
    return Classifier(override + [r for _, _, r in builtin])


@functools.lru_cache(maxsize=1)
def default_classifier() -> Classifier:
    """The built-in rule set, compiled once per process."""
    return load_rules()


def classify(code: int | None, enhanced: str | None, text: str | None) -> Classification:
    """Classify with the built-in rules. See :class:`Classifier` for local overrides."""
    return default_classifier().classify(code, enhanced, text)


def classify_reply(reply: str) -> Classification:
    """Parse and classify a raw SMTP reply with the built-in rules."""
    return default_classifier().classify_reply(reply)
