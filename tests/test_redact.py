"""Issue 20, item 3: redaction on export.

The detectors are pure logic (no false positive on plain numbers, dates, UUIDs; Luhn
and IBAN mod-97 checked); the exports go through the CLI against a real store, which
stays whole.
"""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pytest
from click.testing import CliRunner

from sessionq.cli import main
from sessionq.errors import ConfigError
from sessionq.models import Settings, Store, open_store
from sessionq.models.redact import Redactor, iban_valid, load_hook, luhn_valid, redact_text
from sessionq.workers.logs import redact
from tests.conftest import POSTGRES_URL, messages, session

SECRET_TEXT = "card 4111 1111 1111 1111, mail jane.doe@example.org, call +44 20 7946 0958"


@pytest.mark.parametrize(("text", "expected"), [
    ("write to jane.doe+news@mail.example.co.uk today", "write to [email] today"),
    ("call +49 30 1234567 now", "call [phone] now"),
    ("call (555) 123-4567 or 555-123-4567", "call [phone] or [phone]"),
    ("Festnetz 030 1234567", "Festnetz [phone]"),
    ("visa 4111 1111 1111 1111 amex 3782-822463-10005", "visa [card] amex [card]"),
    ("pay 4012888888881881.", "pay [card]."),
    ("IBAN DE89 3704 0044 0532 0130 00 ok", "IBAN [iban] ok"),
    ("GB82WEST12345698765432", "[iban]"),
    ("key sk-ant-api03-abcdefghijklmnopqrstuvwxyz0123", "key [secret]"),
    ("aws AKIAIOSFODNN7EXAMPLE gh ghp_" + "a" * 36, "aws [secret] gh [secret]"),
    ("Authorization: Bearer abc.def.ghi", "Authorization: Bearer [secret]"),
    ('{"api_key": "hunter2"}', '{"api_key": "[secret]"}'),
    ("postgresql://app:s3cret@db/x", "postgresql://app:***@db/x"),
])
def test_each_detector_replaces_what_it_finds(text: str, expected: str) -> None:
    assert redact_text(text) == expected


@pytest.mark.parametrize("text", [
    "order 1234567890 shipped",                          # a plain number: no + or separator
    "on 2024-01-15 at 10:30:00, or 15.01.2024",          # dates and times
    "id 123e4567-e89b-12d3-a456-426614174000",           # a UUID
    "4111 1111 1111 1112 fails Luhn",                    # card-length, wrong check digit
    "1234 5678 9012 3456 and 0000000000000000",          # Luhn-failing / no card network
    "DE89 3704 0044 0532 0130 01",                       # IBAN shape, mod-97 fails
    "version 1.2.3.4, ip 192.168.1.100, total 12.50",
    "unix time 1701700000000 hex 0xdeadbeef12345678",
    "the token: set and a Bearer token",                 # prose, not credentials
    "sk-short and a_b@c",
])
def test_no_false_positive_on_look_alikes(text: str) -> None:
    assert redact_text(text) == text


def test_luhn_and_iban_checks() -> None:
    assert luhn_valid("79927398713") and not luhn_valid("79927398710")
    assert iban_valid("DE89 3704 0044 0532 0130 00") and iban_valid("NL91ABNA0417164300")
    assert not iban_valid("NL91ABNA0417164301") and not iban_valid("DE89")


def test_the_redactor_counts_and_keeps_identities_in_records() -> None:
    redactor = Redactor()
    record = {"type": "message", "session_id": "jane@example.org", "message_id": "m1", "role": "user",
              "content": SECRET_TEXT, "created_at": "2024-01-15T10:30:00+00:00",
              "metadata": {"phones": ["+1 415 555 0100"], "n": 4111111111111111}}
    out = redactor.record(record)
    # Ids, roles and times stay (an import still works); every other string is redacted
    assert out["session_id"] == "jane@example.org" and out["created_at"] == record["created_at"]
    assert out["content"] == "card [card], mail [email], call [phone]"
    assert out["metadata"] == {"phones": ["[phone]"], "n": 4111111111111111}
    assert redactor.counts == {"card": 1, "email": 1, "phone": 2}


def shout(text: str) -> str:
    """A redaction hook for the tests: masks the word "Acme"."""
    return text.replace("Acme", "[org]")


def test_a_hook_runs_after_the_built_in_detectors() -> None:
    redactor = Redactor.from_settings(Settings(redact_hook="tests.test_redact:shout"))
    assert redactor.text("Acme, a@b.io") == "[org], [email]"
    assert load_hook("tests.test_redact.shout") is shout
    with pytest.raises(ConfigError, match=r"redact_hook 'tests\.nope:f': cannot load it"):
        load_hook("tests.nope:f")
    with pytest.raises(ConfigError, match="not a module:function"):
        load_hook("tests.test_redact:SECRET_TEXT")


def test_logs_mask_api_keys_from_the_same_shapes() -> None:
    assert redact("calling with sk-proj-abcdefghijklmnopqrstuvwx1234") == "calling with ***"
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "key %s", ("AKIAIOSFODNN7EXAMPLE",), None)
    assert "AKIA" not in redact(record.getMessage())


@pytest.fixture
def exported_store(pg_store: Store) -> Store:
    pg_store.save_session(session("s-1", metadata={"email": "jane.doe@example.org"}),
                          [*messages("s-1", 1), messages("s-1", 1, start=1)[0].replace(content=SECRET_TEXT)])
    return pg_store


@pytest.mark.parametrize("fmt", ["json", "text", "markdown"])
def test_cli_export_redact_writes_a_redacted_copy_and_keeps_the_store_whole(
    exported_store: Store, tmp_path: Path, fmt: str
) -> None:
    out = tmp_path / f"s-1.{fmt}"
    # When a session is exported with --redact, to a file and to stdout
    result = CliRunner().invoke(main, ["--storage-url", POSTGRES_URL, "export", "s-1", "--format", fmt,
                                       "-o", str(out), "--redact"])
    assert result.exit_code == 0, result.output
    stdout = CliRunner().invoke(main, ["--storage-url", POSTGRES_URL, "export", "s-1", "--format", fmt, "--redact"])
    # Then neither copy holds the card, the e-mail (content and metadata) or the phone
    for text in (out.read_text(encoding="utf-8"), stdout.output):
        assert "4111" not in text and "jane.doe" not in text and "7946" not in text
        assert "[card]" in text and "[email]" in text and "[phone]" in text and "s-1" in text
    if fmt == "json":
        assert json.loads(out.read_text())["messages"][1]["content"] == "card [card], mail [email], call [phone]"
    # ... and the store still holds everything
    assert exported_store.load_messages("s-1")[1].content == SECRET_TEXT
    assert exported_store.load_session("s-1").metadata == {"email": "jane.doe@example.org"}
    # ... while an export without --redact is whole
    plain = CliRunner().invoke(main, ["--storage-url", POSTGRES_URL, "export", "s-1", "--format", fmt])
    assert "4111 1111 1111 1111" in plain.output


@pytest.mark.parametrize("name", ["all.jsonl.gz", "all.json"])
def test_cli_export_all_redact_still_imports(exported_store: Store, tmp_path: Path, name: str) -> None:
    out = tmp_path / name
    result = CliRunner().invoke(main, ["--storage-url", POSTGRES_URL, "export-all", "-o", str(out), "--redact"])
    assert result.exit_code == 0, result.output
    if name.endswith(".gz"):
        with gzip.open(out, "rt") as fp:
            text = fp.read()
    else:
        text = out.read_text()
    assert "4111" not in text and "jane.doe" not in text and "[card]" in text
    # The redacted copy imports into another store, ids and order intact
    copy_url = f"sqlite:///{tmp_path / 'copy.db'}"
    imported = CliRunner().invoke(main, ["--storage-url", copy_url, "import", str(out)])
    assert imported.exit_code == 0, imported.output
    copy = open_store(copy_url)
    try:
        contents = [m.content for m in copy.load_messages("s-1")]
        assert contents == ["message 0", "card [card], mail [email], call [phone]"]
    finally:
        copy.close()
    assert exported_store.load_messages("s-1")[1].content == SECRET_TEXT


def test_cli_export_redact_with_a_bad_hook_is_one_line(exported_store: Store) -> None:
    result = CliRunner().invoke(main, ["--storage-url", POSTGRES_URL, "export", "s-1", "--redact"],
                                env={"SESSIONQ_REDACT_HOOK": "no.such:module"})
    assert result.exit_code == 1
    assert result.output.strip().startswith("Error: redact_hook 'no.such:module': cannot load it")
