"""The reply classifier against real provider replies, and its rule loading."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.errors import ConfigError
from engine.feedback import CATEGORIES, Classification, classify, classify_reply, load_rules, parse_reply

REPO = Path(__file__).resolve().parent.parent

# (reply as the server sent it, expected category, expected permanent)
REAL_REPLIES: list[tuple[str, str, bool]] = [
    # ---- Google (Gmail / Workspace)
    (
        "550-5.1.1 The email account that you tried to reach does not exist. Please try\r\n"
        "550-5.1.1 double-checking the recipient's email address for typos or\r\n"
        "550-5.1.1 unnecessary spaces. For more information, go to\r\n"
        "550 5.1.1  https://support.google.com/mail/?p=NoSuchUser d2si123 - gsmtp",
        "unknown_user",
        True,
    ),
    ("550-5.2.1 The email account that you tried to reach is disabled. Learn more at\r\n550 5.2.1  https://support.google.com/mail/?p=DisabledUser x1si - gsmtp", "mailbox_disabled", True),
    ("552-5.2.2 The email account that you tried to reach is over quota. Please direct\r\n552 5.2.2 the recipient to https://support.google.com/mail/?p=OverQuotaTemp - gsmtp", "mailbox_full", True),
    ("452-4.2.2 The email account that you tried to reach is over quota. Please direct\r\n452 4.2.2 the recipient to https://support.google.com/mail/?p=OverQuotaTemp - gsmtp", "mailbox_full", False),
    ("450-4.2.1 The user you are trying to contact is receiving mail at a rate that\r\n450 4.2.1 prevents additional messages from being delivered. - gsmtp", "rate_limited", False),
    ("421-4.7.0 [192.0.2.1] Our system has detected an unusual rate of\r\n421-4.7.0 unsolicited mail originating from your IP address. - gsmtp", "reputation_block", False),
    ("550-5.7.1 [192.0.2.22] Our system has detected that this message is likely\r\n550-5.7.1 unsolicited mail. To reduce the amount of spam sent to Gmail - gsmtp", "content_spam", True),
    ("550-5.7.1 [192.0.2.22 18] Our system has detected that this message is likely suspicious due to the very low reputation of the sending IP address.", "reputation_block", True),
    ("550-5.7.26 This mail has been blocked because the sender is unauthenticated.\r\n550-5.7.26 Gmail requires all senders to authenticate with either SPF or DKIM.", "auth_failure", True),
    ("550-5.7.26 Unauthenticated email from example.org is not accepted due to domain's\r\n550 5.7.26 DMARC policy. - gsmtp", "auth_failure", True),
    ("550-5.7.25 [192.0.2.202] The IP address sending this message does not have a\r\n550 5.7.25 PTR record setup - gsmtp", "policy", True),
    ("552-5.3.4 Your message exceeded Google's message size limits. - gsmtp", "message_too_big", True),
    ("550-5.7.1 Messages with multiple addresses in From: header are not accepted. - gsmtp", "protocol_error", True),
    ("530 5.7.0 Must issue a STARTTLS command first. - gsmtp", "protocol_error", True),
    ("550 5.4.5 Daily user sending quota exceeded. - gsmtp", "rate_limited", True),
    ("421 4.3.0 Temporary System Problem.  Try again later. - gsmtp", "transient_other", False),
    # ---- Microsoft (Outlook.com, Hotmail, Office 365)
    ("550 5.5.0 Requested action not taken: mailbox unavailable (S2017062302). [AM4PEPF00025F97.EURPRD83.prod.outlook.com]", "unknown_user", True),
    ("550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient user@contoso.com not found by SMTP address lookup", "unknown_user", True),
    ("550 5.4.1 Recipient address rejected: Access denied. AS(201806281) [DB5EUR03FT010.eop-EUR03.prod.protection.outlook.com]", "unknown_user", True),
    ("550 5.7.1 Unfortunately, messages from [192.0.2.1] weren't sent. Please contact your Internet service provider since part of their network is on our block list (S3150).", "reputation_block", True),
    ("550 5.7.606 Access denied, banned sending IP [192.0.2.1]. To request removal from this list please visit https://sender.office.com/", "reputation_block", True),
    ("451 4.7.650 The mail server [192.0.2.25] has been temporarily rate limited due to IP reputation. For e-mail delivery information, see https://postmaster.live.com (S775)", "reputation_block", False),
    ("451 4.7.500 Server busy. Please try again later from [192.0.2.1]. (S77719)", "rate_limited", False),
    ("550 5.7.509 Access denied, sending domain [EXAMPLE.JP] does not pass DMARC verification and has a DMARC policy of reject.", "auth_failure", True),
    ("550 5.7.515 Access denied, sending domain EXAMPLE.JP doesn't meet the required authentication level.", "auth_failure", True),
    ("554 5.2.2 mailbox full; STOREDRV.Deliver.Exception:QuotaExceededException.MapiExceptionShutoffQuotaExceeded", "mailbox_full", True),
    ("550 5.7.520 Access denied, Your organization does not allow external forwarding.", "policy", True),
    # ---- Yahoo / AOL
    ("554 delivery error: dd This user doesn't have a yahoo.com account (nobody@yahoo.com) [0] - mta1234.mail.ne1.yahoo.com", "unknown_user", True),
    ("554 delivery error: dd Sorry your message to x@yahoo.com cannot be delivered. This account has been disabled or discontinued [#102]. - mta1010.mail.bf1.yahoo.com", "mailbox_disabled", True),
    ("421 4.7.0 [TSS04] Messages from 192.0.2.25 temporarily deferred due to unexpected volume or user complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes", "reputation_block", False),
    ("553 5.7.1 [BL21] Connections will not be accepted from 192.0.2.1, because the ip is in Spamhaus's list; see https://postmaster.yahooinc.com/error-codes", "reputation_block", True),
    ("554 5.7.9 Message not accepted for policy reasons.  See https://help.yahoo.com/kb/postmaster/SLN7253.html", "policy", True),
    ("550 5.7.9 This mail has been blocked because the sender is unauthenticated. Yahoo requires all senders to authenticate with either SPF or DKIM.", "auth_failure", True),
    ("552 1 Requested mail action aborted, mailbox not found", "unknown_user", True),
    # ---- Apple iCloud
    ("550 5.1.1 <nobody@icloud.com>: user does not exist", "unknown_user", True),
    ("552 5.2.2 <full@icloud.com>: user is over quota", "mailbox_full", True),
    ("554 5.7.1 Your message was rejected due to example.org's DMARC policy. See https://support.apple.com/en-us/HT204137 for info", "auth_failure", True),
    ("554 5.7.1 [CS01] Message rejected due to local policy. Please visit https://support.apple.com/en-us/HT204137", "reputation_block", True),
    ("554 5.7.1 [HM08] Message rejected due to local policy. Please visit https://support.apple.com/en-us/HT204137", "policy", True),
    # ---- Comcast, Cox, Orange, others
    ("550 5.1.1 <nobody@comcast.net> Not our Customer", "unknown_user", True),
    ("421 4.1.0 192.0.2.1 Throttled - try again later. Please see http://postmaster.comcast.net/smtp-error-codes.php#RL000010", "rate_limited", False),
    ("554 resimta-po-20v.sys.comcast.net comcast 192.0.2.1 Comcast BL004 Blocked for spam.  Please see http://postmaster.comcast.net/smtp-error-codes.php#BL000004", "reputation_block", True),
    ("550 5.1.0 <bounce@example.com> sender rejected. Refer to Error Codes section at https://www.cox.com/residential/support/email-error-codes.html for more information. AUP#CDRBL", "reputation_block", True),
    ("550 mwinf5c04 ME Adresse IP source bloquee pour incident de spam. Client host blocked for spamming issues. OFR006_102", "reputation_block", True),
    ("550 Ip frequency limited [Blocked IP 192.0.2.22]. http://service.mail.qq.com/cgi-bin/help?subtype=1&&id=20022", "rate_limited", True),
    ("554 5.7.1 Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org; https://www.spamhaus.org/query/ip/192.0.2.1", "reputation_block", True),
    ("554 Blocked - see https://support.proofpoint.com/dnsbl-lookup.cgi?ip=192.0.2.225", "reputation_block", True),
    ("554 email rejected due to security policies - MCSpamSignature.sa.2.2", "content_spam", True),
    ("550 5.7.1 Message content rejected, UBE, id=00000-22-225", "content_spam", True),
    ("550 Virus Detected; Content Rejected", "content_spam", True),
    # ---- generic MTA wording (Postfix, Sendmail, Exim, qmail)
    ("550 5.1.1 <nobody@example.org>: Recipient address rejected: User unknown in local recipient table", "unknown_user", True),
    ("550 5.1.1 <nobody@example.org>... User unknown", "unknown_user", True),
    ("552 5.2.2 <full@example.org>: Recipient address rejected: Mailbox full", "mailbox_full", True),
    ("452 4.2.2 <full@example.org>... Mailbox Full", "mailbox_full", False),
    ("525 5.7.13 <x@example.org>: Recipient address rejected: User account disabled", "mailbox_disabled", True),
    ("552 5.3.4 Message size exceeds fixed limit", "message_too_big", True),
    ("554 5.7.1 <x@example.org>: Relay access denied", "policy", True),
    ("450 4.7.1 <host.example.org[192.0.2.56]>: Client host rejected: cannot find your reverse hostname", "policy", False),
    ("450 4.2.0 <x@example.org>: Recipient address rejected: Greylisted, see http://postgrey.schweikert.ch/help/example.org.html", "transient_other", False),
    ("452 4.3.2 Connection rate limit exceeded.", "rate_limited", False),
    ("421 4.7.0 example.org Error: too many errors", "rate_limited", False),
    ("554 5.4.6 Too many hops", "network_error", True),
    ("503 5.5.1 Error: need RCPT command", "protocol_error", True),
    ("500 5.5.2 Error: bad syntax", "protocol_error", True),
    ("550 5.1.2 Host unknown (Name server: example.invalid: host not found)", "bad_domain", True),
    ("Sorry, I couldn't find a mail exchanger or IP address. (#5.4.4)", "bad_domain", True),
    ("556 5.1.10 Recipient address has null MX", "bad_domain", True),
    ("554 4.4.7 Message expired: unable to deliver in 840 minutes.<421 4.4.2 Connection timed out>", "expired", True),
    ("connect to mx.example.org[192.0.2.1]:25: Connection timed out", "network_error", False),
    ("lost connection with mx.example.org[192.0.2.1] while receiving the initial server greeting", "network_error", False),
    ("550 5.7.1 Email rejected per DMARC policy for example.org", "auth_failure", True),
    ("550 5.7.23 SPF validation failed", "auth_failure", True),
    ("451 4.7.1 Please try again later", "policy", False),
    ("250 2.0.0 Ok: queued as 4Jc1Yq0xyz", "delivered", False),
]


@pytest.mark.parametrize("reply,category,permanent", REAL_REPLIES, ids=[r[0][:60] for r in REAL_REPLIES])
def test_real_replies(reply: str, category: str, permanent: bool) -> None:
    c = classify_reply(reply)
    assert (c.category, c.permanent) == (category, permanent), c.rule


def test_parse_reply_multiline_joins_text_and_keeps_first_codes() -> None:
    code, enhanced, text = parse_reply("550-5.1.1 The email account that you tried to reach\r\n550-5.1.1 does not exist.\r\n550 5.1.1 gsmtp")
    assert code == 550 and enhanced == "5.1.1"
    assert text == "The email account that you tried to reach does not exist. gsmtp"


def test_parse_reply_variants() -> None:
    assert parse_reply("421 Service not available") == (421, None, "Service not available")
    assert parse_reply("550") == (550, None, "")
    assert parse_reply("host mx.example.org[192.0.2.1] said: 550 5.1.1 <a@b.example>: unknown")[:2] == (550, "5.1.1")
    assert parse_reply("Remote host said: 552 Error: disk quota exceeded (#5.2.2)")[:2] == (552, "5.2.2")
    assert parse_reply("no codes at all")[:2] == (None, None)
    assert parse_reply("")[:2] == (None, None)
    # an IPv4 address is not an enhanced status code
    assert parse_reply("connect to 192.0.2.1 failed")[1] is None


def test_permanence_follows_the_code_over_the_category() -> None:
    assert classify(450, "4.1.1", "user unknown").permanent is False
    assert classify(550, None, "try again later").permanent is True
    # the basic code wins over a disagreeing enhanced code
    assert classify(451, "5.7.1", "rejected").permanent is False
    # no code: the category's default decides
    assert classify(None, None, "Mailbox full").permanent is False
    assert classify(None, None, "User unknown").permanent is True
    assert classify(None, "5.1.1", "").category == "unknown_user"


def test_unknown_text_falls_back_to_other() -> None:
    assert classify(None, None, "zzz") == Classification("transient_other", False, "default:unknown")
    assert classify(554, None, "zzz").category == "permanent_other"
    assert classify(None, None, None).category == "transient_other"
    assert classify("bogus", "not-a-code", "x").category == "transient_other"  # type: ignore[arg-type]


def test_hard_means_the_address_is_bad() -> None:
    assert classify_reply("550 5.1.1 user unknown").hard
    assert not classify_reply("450 4.1.1 user unknown").hard
    assert not classify_reply("552 5.2.2 mailbox full").hard


def test_override_file_takes_precedence(tmp_path: Path) -> None:
    rules = tmp_path / "local.toml"
    rules.write_text(
        """
[[rule]]
name = "local.greylist_is_rate"
category = "rate_limited"
text = ["greylisted"]

[[rule]]
name = "local.code_only"
category = "policy"
enhanced = ["5.1.1"]
code = [551]
"""
    )
    clf = load_rules([rules])
    assert clf.classify_reply("450 4.2.0 Greylisted, see http://x").rule == "local.greylist_is_rate"
    assert clf.classify_reply("551 5.1.1 anything").category == "policy"
    assert clf.classify_reply("550 5.1.1 user unknown").category == "unknown_user"


@pytest.mark.parametrize(
    "doc,needle",
    [
        ('[[rule]]\nname="x"\ncategory="nope"\ntext=["a"]\n', "category"),
        ('[[rule]]\nname="x"\ncategory="policy"\ntext=["(unclosed"]\n', "bad regex"),
        ('[[rule]]\nname="x"\ncategory="policy"\n', "needs at least one"),
        ('[[rule]]\nname="x"\ncategory="policy"\nenhanced=["5.1"]\n', "enhanced code pattern"),
        ('[[rule]]\nname="x"\ncategory="policy"\ntext="a"\ncolour="red"\n', "unknown key"),
        ("this is = not toml [", "not valid TOML"),
    ],
)
def test_bad_rule_files_name_the_problem(tmp_path: Path, doc: str, needle: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(doc)
    with pytest.raises(ConfigError, match=needle):
        load_rules([path])


def test_missing_rule_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_rules([tmp_path / "absent.toml"])


def test_builtin_rules_use_known_categories() -> None:
    clf = load_rules()
    assert len(clf.rules) > 50
    assert {r.category for r in clf.rules} <= set(CATEGORIES)
    names = [r.name for r in clf.rules]
    assert len(names) == len(set(names)), "rule names must be unique so a classification can be traced"


def test_huge_reply_is_bounded() -> None:
    c = classify_reply("550 5.1.1 " + "x" * 2_000_000)
    assert c.category == "unknown_user"


def test_cli_classify_args_and_stdin() -> None:
    env_py = sys.executable
    out = subprocess.run(
        [env_py, "-m", "engine", "classify", "550 5.1.1 user unknown", "452 4.2.2 mailbox full"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=True,
    ).stdout.splitlines()
    rows = [json.loads(x) for x in out]
    assert [(r["category"], r["permanent"]) for r in rows] == [("unknown_user", True), ("mailbox_full", False)]
    assert set(rows[0]) == {"reply", "category", "permanent", "rule"}
    stdin = "\n".join(r for r, _, _ in REAL_REPLIES if "\n" not in r) + "\n"
    res = subprocess.run(
        [env_py, "-m", "engine", "classify"], input=stdin, cwd=REPO, capture_output=True, text=True, timeout=60, check=True
    )
    assert len(res.stdout.splitlines()) == stdin.count("\n")
