"""Redaction: the one place for the shapes of secrets and personal data.

Two users:

* the logs (:func:`sessionq.workers.logs.redact`) mask secrets with ``***`` through
  :func:`redact_secrets`: URL passwords, ``Bearer``/``Basic`` credentials,
  ``token=...``-style values and API-key shapes;
* exports with ``--redact`` (``sessionq export``, ``export-all``, and any download a
  console offers: call :meth:`Redactor.text` / :meth:`Redactor.record`) replace, on the
  copy written out, secrets and personal data with a tag such as ``[email]``. The stored
  data stays whole.

Built-in detectors, in the order they run: secrets (``[secret]``), IBANs with a valid
ISO 13616 mod-97 check (``[iban]``), payment card numbers of 13 to 19 digits with a valid
Luhn check digit and a card-network first digit (``[card]``), e-mail addresses
(``[email]``) and phone numbers (``[phone]``: an international ``+`` number of 8 to 15
digits, a North-American ``(555) 123-4567`` / ``555-123-4567``, or a national number
written with a leading 0 and a separator, ``030 1234567``). Numbers that only look
similar are left: plain digit runs without a ``+`` or a separator, dates and times,
UUIDs and other hex ids, card-length numbers failing Luhn, IBAN-shaped text failing
mod-97.

A hook adds detectors of your own: the setting ``redact_hook``
(``SESSIONQ_REDACT_HOOK``) names a ``module:function`` taking and returning text, run
after the built-in ones (:meth:`Redactor.from_settings`).
"""

from __future__ import annotations

import importlib
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sessionq.errors import ConfigError

from .settings import Settings, redact_url

# -- secret shapes (logs and exports) ------------------------------------------------

# A credential after "Bearer" or "Authorization: Basic" (token68 characters).
_BEARER_RE = re.compile(r"(?i)\b((?:bearer|authorization[\"']?\s*[=:]\s*[\"']?basic)\s+)([A-Za-z0-9._~+/=-]+)")
# A secret-named key, its separator, and its value: quoted (all of it) or bare (up to a
# delimiter; closing parentheses after it are left, as in "(password=***)"). Each part
# is unambiguous or bounded, so a hostile line costs linear time.
_TOKEN_RE = re.compile(
    r"""(?ix)
    (?P<key>secret\w{0,40}|api[_-]?key|token|passw(?:or)?d)
    (?P<sep>["']?[ \t]{0,8}[=:][ \t]{0,8})
    (?:
        (?P<quote>")(?:[^"\\]|\\.){0,4096}"
      | (?P<squote>')(?:[^'\\]|\\.){0,4096}'
      | (?P<bare>\)*[^\s"'&,;}\])]+(?:\)+[^\s"'&,;}\])]+)*)
    )""")
# Words of prose, not credentials: "token: set", "(using password: YES)", "a Bearer token".
# A closed list: any other word after such a key is masked, however plain it looks.
_PROSE_WORDS = frozenset({
    "set", "unset", "yes", "no", "none", "null", "missing", "required", "given", "configured", "empty",
    "invalid", "wrong", "expired", "token", "tokens", "auth", "authentication", "header", "is", "was", "the", "a",
})
#: API keys recognisable by their shape alone (vendor prefixes), wherever they appear.
API_KEY_RE = re.compile(
    r"""(?x)(?<![A-Za-z0-9_-])(?:
        sk-(?:ant-|proj-)?[A-Za-z0-9_-]{20,}          # OpenAI, Anthropic
      | (?:sk|pk|rk)_(?:live|test)_[A-Za-z0-9]{16,}   # Stripe
      | gh[pousr]_[A-Za-z0-9]{36,}                    # GitHub tokens
      | github_pat_[A-Za-z0-9_]{22,}                  # GitHub fine-grained tokens
      | glpat-[A-Za-z0-9_-]{20,}                      # GitLab
      | xox[abposr]-[A-Za-z0-9-]{10,}                 # Slack
      | AKIA[0-9A-Z]{16}                              # AWS access key id
      | AIza[0-9A-Za-z_-]{35}                         # Google API key
      | eyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}  # JWT
    )(?![A-Za-z0-9_-])""")


def redact_secrets(text: str, mask: str = "***") -> str:
    """Replace the secrets in ``text`` with ``mask``: URL passwords, Bearer/Basic
    credentials, ``token=...``-style values and API-key shapes.

    Only the secret values go: the words around them stay, and a plain word after
    ``token:`` or ``Bearer`` is prose, not a credential (``without an API token: set ...``).
    """

    def credential(match: re.Match[str]) -> str:
        return match[0] if match[2].lower() in _PROSE_WORDS else f"{match[1]}{mask}"

    def value(match: re.Match[str]) -> str:
        key, sep = match["key"], match["sep"]
        quote = match["quote"] or match["squote"]
        if quote:
            return f"{key}{sep}{quote}{mask}{quote}"
        # "key: value" in prose names no secret when the value is a plain word
        if ":" in sep and sep[-1].isspace() and sep[0] not in "\"'" and match["bare"].lower() in _PROSE_WORDS:
            return match[0]
        return f"{key}{sep}{mask}"

    text = redact_url(text)  # a URL password is always "***" (settings.redact_url)
    text = _BEARER_RE.sub(credential, text)
    text = _TOKEN_RE.sub(value, text)
    return API_KEY_RE.sub(mask, text)


# -- personal data ------------------------------------------------------------------

_EMAIL_RE = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63})*\.[A-Za-z]{2,24}\b")
# Candidates only; each is checked by its validator. Boundaries keep them out of longer
# tokens (UUIDs, hex ids, words).
_IBAN_RE = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?(?![A-Za-z0-9])")
# A card candidate starts a run of digits (not after "4 ", so the tail of an IBAN or of a
# longer grouped number is not a candidate of its own).
_CARD_RE = re.compile(r"(?<![\w-])(?<!\d[ -])\d(?:[ -]?\d){12,18}(?![\w-])")
_PHONE_RE = re.compile(
    r"""(?x)(?<![\w+-])(?<!\d[ .-])(?:
        \+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}             # international: +49 30 1234567
      | \(\d{3}\)[ .-]?\d{3}[ .-]\d{4}                     # (555) 123-4567
      | \d{3}[.-]\d{3}[.-]\d{4}                            # 555-123-4567
      | 0\d{1,4}[ /-]\d{3,8}(?:[ -]\d{2,5})?               # 030 1234567, 0171-1234567
    )(?![\w-])""")


def luhn_valid(digits: str) -> bool:
    """True when the digit string passes the Luhn check (payment card numbers)."""
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char)
        if index % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def iban_valid(text: str) -> bool:
    """True for an IBAN (spaces allowed) of 15 to 34 characters whose ISO 13616 check
    (mod 97 of the rearranged number) is 1."""
    iban = text.replace(" ", "")
    if not 15 <= len(iban) <= 34:
        return False
    rearranged = iban[4:] + iban[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def _card(match: str) -> bool:
    digits = re.sub(r"[ -]", "", match)
    return 13 <= len(digits) <= 19 and digits[0] in "23456" and luhn_valid(digits)


def _phone(match: str) -> bool:
    digits = sum(c.isdigit() for c in match)
    return 8 <= digits <= 15 if match.startswith("+") else 9 <= digits <= 12


@dataclass(frozen=True)
class Detector:
    """One kind of data to redact: candidates by ``pattern``, kept when ``check`` says
    so, replaced by ``[name]``."""

    name: str
    pattern: re.Pattern[str]
    check: Callable[[str], bool] | None = None

    def sub(self, text: str, counts: Counter[str]) -> str:
        """``text`` with every confirmed match replaced; tallies them in ``counts``."""

        def replace(match: re.Match[str]) -> str:
            if self.check is not None and not self.check(match[0]):
                return match[0]
            counts[self.name] += 1
            return f"[{self.name}]"

        return self.pattern.sub(replace, text)


#: The built-in detectors after the secrets, in the order they run.
DETECTORS: tuple[Detector, ...] = (
    Detector("iban", _IBAN_RE, iban_valid),
    Detector("card", _CARD_RE, _card),
    Detector("email", _EMAIL_RE),
    Detector("phone", _PHONE_RE, _phone),
)
#: Record fields :meth:`Redactor.record` leaves whole: identities, times, states, sizes
#: (what an import needs to put the record back), besides every ``*_at`` field.
KEEP_FIELDS = frozenset({
    "type", "session_id", "message_id", "file_id", "mcp_session_id", "agent_id", "key", "task_id", "owner",
    "role", "status", "model", "seq", "message_count", "provider_name", "mime_type", "size", "tool", "leg",
    "attempt", "max_attempts", "version", "worker_id", "recovery_attempts", "time_limit_ms", "poll_interval_ms",
})


class Redactor:
    """Replaces secrets and personal data in text and in records (see the module docs).

    ``counts`` tallies what was replaced, by detector name (``secret``, ``iban``, ...).
    """

    def __init__(self, detectors: Sequence[Detector] = DETECTORS, *, hook: Callable[[str], str] | None = None) -> None:
        self.detectors = tuple(detectors)
        self.hook = hook
        self.counts: Counter[str] = Counter()

    @classmethod
    def from_settings(cls, settings: Settings) -> Redactor:
        """The built-in detectors plus the ``redact_hook`` setting's function, if set."""
        return cls(hook=load_hook(settings.redact_hook) if settings.redact_hook else None)

    def text(self, text: str) -> str:
        """``text`` with every detected secret and personal datum replaced by a tag."""
        redacted = redact_secrets(text, "[secret]")
        secrets = redacted.count("[secret]") - text.count("[secret]")
        if secrets > 0:
            self.counts["secret"] += secrets
        for detector in self.detectors:
            redacted = detector.sub(redacted, self.counts)
        if self.hook is not None:
            redacted = self.hook(redacted)
        return redacted

    def value(self, value: Any) -> Any:
        """A JSON value with every string in it redacted (keys stay)."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, list):
            return [self.value(v) for v in value]
        if isinstance(value, Mapping):
            return {k: self.value(v) for k, v in value.items()}
        return value

    def record(self, data: Mapping[str, Any]) -> dict[str, Any]:
        """A record's JSON (``to_json``) with every field redacted except
        :data:`KEEP_FIELDS` and times, so the result still imports."""
        return {k: v if k in KEEP_FIELDS or k.endswith("_at") else self.value(v) for k, v in data.items()}


def load_hook(path: str) -> Callable[[str], str]:
    """The function ``module:function`` (or ``module.function``) names;
    :class:`~sessionq.errors.ConfigError` naming the setting if it cannot be loaded."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    try:
        hook = getattr(importlib.import_module(module_name), attr) if module_name and attr else None
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"redact_hook {path!r:.120}: cannot load it ({exc})") from None
    if not callable(hook):
        raise ConfigError(f"redact_hook {path!r:.120}: not a module:function that takes and returns text")
    return hook


def redact_text(text: str) -> str:
    """``text`` redacted by the built-in detectors (no hook): what ``--redact`` writes."""
    return Redactor().text(text)
