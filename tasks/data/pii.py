"""Personal data and secrets in text: find them, then redact, reject or keep per kind.

Each kind is found by a loose pattern and confirmed by a validator, because look-alikes are everywhere in chat
data (versions, dates, ISBNs, order numbers):
  email        address pattern with a dotted domain and a letter TLD
  phone        libphonenumber's matcher (valid numbers only) in the configured regions or with a +country code;
               a digit string right after an identifier word (order, invoice, ISBN, 订单, 编号, ...) or next to
               arithmetic (digits joined by = + × * / ÷) is not a phone
  ip_address   IPv4 / IPv6 parsed by `ipaddress` and globally routable (private, loopback and documentation ranges
               are not personal); a dotted quad after "v" / "version" / "版本" is a version number
  credit_card  13-19 digits in one group or groups of 4 (Amex 4-6-5), a known network's prefix, and the Luhn check
  iban         country format and mod-97 checksum (python-stdnum)
  secret       token shapes with a vendor prefix (AWS, GitHub, GitLab, Slack, Stripe, OpenAI, Anthropic, Google,
               Hugging Face, npm), JWTs and PEM private-key blocks

Rows are first screened in polars with one Rust regex that every finding must match, so only the few candidate
texts reach the Python validators.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

import phonenumbers
import polars as pl
from stdnum import iban as stdnum_iban
from stdnum import luhn

from tasks.core.config import PiiConfig

KINDS = ("secret", "email", "iban", "credit_card", "ip_address", "phone")  # overlap priority, first wins
PLACEHOLDER = {"email": "<EMAIL>", "phone": "<PHONE>", "ip_address": "<IP_ADDRESS>", "credit_card": "<CREDIT_CARD>",
               "iban": "<IBAN>", "secret": "<SECRET>"}

_SECRET = re.compile("|".join([
    r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",                                   # AWS access key id
    r"\bgh[pousr]_[A-Za-z0-9]{36,255}\b", r"\bgithub_pat_[A-Za-z0-9_]{22,255}\b",
    r"\bglpat-[A-Za-z0-9_-]{20,}",                                       # GitLab
    r"\bxox[abposr]-[A-Za-z0-9-]{10,}",                                  # Slack
    r"\b[sr]k_(?:live|test)_[A-Za-z0-9]{16,}\b",                         # Stripe
    r"\bsk-ant-[A-Za-z0-9_-]{20,}", r"\bsk-(?:proj-)?[A-Za-z0-9_-]{32,}",  # Anthropic, OpenAI
    r"\bAIza[0-9A-Za-z_-]{35}(?![0-9A-Za-z_-])",                        # Google API key
    r"\bhf_[A-Za-z0-9]{34,}\b", r"\bnpm_[A-Za-z0-9]{36}\b",
    r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",  # JWT: base64url JSON header.payload.sig
    r"-----BEGIN (?:[A-Z]+ )*PRIVATE KEY-----[\s\S]*?-----END (?:[A-Z]+ )*PRIVATE KEY-----",
]), re.ASCII)  # ASCII: a Chinese character next to a token is a boundary, not part of a word
_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@(?:[A-Za-z0-9-]{1,63}\.)+[A-Za-z]{2,24}(?![\w-])", re.ASCII)
_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}(?![A-Za-z0-9])", re.ASCII)
_CARD = re.compile(r"(?<![\w.,-])(?:\d{13,19}|\d{4}(?:[ -]\d{4}){2,3}(?:[ -]\d{1,3})?|\d{4}[ -]\d{6}[ -]\d{5})(?![\w-])", re.ASCII)
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w]|\.\d)", re.ASCII)
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:]|\.\d)", re.ASCII)
_VERSION_BEFORE = re.compile(r"(?:\bv|\bversion\s*|\bver\.?\s*|版本\s*[:：]?\s*)$", re.IGNORECASE | re.ASCII)
_ID_BEFORE = re.compile(r"(?:\border|\binvoice|\btracking|\bisbn|\bid|\bsku|\bref|#|no\.|订单|单号|编号|序列号|账号)"
                        r"[\s:：#号]*$", re.IGNORECASE | re.ASCII)
_ARITHMETIC = re.compile(r"\d\s*\)?\s*[=+×*/÷]\s*\(?\s*\d|[A-Za-z)]\s*[=×*/÷]\s*\(?\s*\d")  # 1387 * i = 223905 - 1858: a sum, not a phone
_GLUED_BEFORE = re.compile(r"(?:[A-Za-z0-9]|[A-Za-z0-9][-_/#])$")  # INV-2023-000123: part of an identifier
# Card prefixes (IIN) of the networks people paste: Visa, Mastercard, Amex, Discover, JCB, UnionPay, Diners.
_CARD_PREFIX = re.compile(r"^(?:4|5[1-5]|2(?:2[2-9]|[3-6]\d|7[01]|720)|3[47]|6011|64[4-9]|65|35(?:2[89]|[3-8]\d)|62|"
                          r"30[0-5]|36|38)")

# Every finding matches this (Rust regex, no look-around): rows that do not are never looked at in Python.
SCREEN = "|".join([
    r"@[A-Za-z0-9-]+\.", r"\d[\s().-]*\d[\s().-]*\d[\s().-]*\d[\s().-]*\d[\s().-]*\d[\s().-]*\d",  # e-mail, 7+ digits
    r"[A-Z]{2}\d{2} ?[A-Z0-9]{4}", r"[0-9A-Fa-f]{0,4}:[0-9A-Fa-f]{0,4}:[0-9A-Fa-f]{0,4}",     # IBAN, IPv6
    r"AKIA|ASIA|gh[pousr]_|github_pat_|glpat-|xox[abposr]-|[sr]k_live_|[sr]k_test_|sk-|AIza|hf_|npm_|eyJ|PRIVATE KEY",
])


@dataclass(frozen=True)
class Finding:
    kind: str
    start: int
    end: int


def _preceded_by(pattern: re.Pattern, text: str, start: int, window: int = 16) -> bool:
    return bool(pattern.search(text[max(0, start - window):start]))


def _identifier_at(text: str, start: int) -> bool:
    """The number at start is an identifier: it follows an id word, or is glued to one (INV-2023-000123)."""
    return _preceded_by(_ID_BEFORE, text, start) or _preceded_by(_GLUED_BEFORE, text, start, 2)


def _luhn_card(digits: str) -> bool:
    return 13 <= len(digits) <= 19 and bool(_CARD_PREFIX.match(digits)) and luhn.is_valid(digits)


def _iban_length(candidate: str) -> int:
    """Length of the longest valid IBAN that starts the candidate and ends before a space or at its end (a greedy
    match may have run into a following word in capitals); 0 when none is."""
    for end in [len(candidate)] + [i for i in range(len(candidate) - 1, 14, -1) if candidate[i] == " "]:
        if stdnum_iban.is_valid(candidate[:end]):
            return end
    return 0


def _public_ip(candidate: str) -> bool:
    try:
        return ipaddress.ip_address(candidate).is_global
    except ValueError:
        return False


def _candidates(text: str, regions: list[str]) -> list[Finding]:
    found = [Finding("secret", m.start(), m.end()) for m in _SECRET.finditer(text)]
    found += [Finding("email", m.start(), m.end()) for m in _EMAIL.finditer(text)]
    found += [Finding("iban", m.start(), m.start() + n) for m in _IBAN.finditer(text) if (n := _iban_length(m.group()))]
    found += [Finding("credit_card", m.start(), m.end()) for m in _CARD.finditer(text)
              if _luhn_card(re.sub(r"[ -]", "", m.group())) and not _identifier_at(text, m.start())]
    found += [Finding("ip_address", m.start(), m.end()) for m in _IPV4.finditer(text)
              if _public_ip(m.group()) and not _preceded_by(_VERSION_BEFORE, text, m.start())]
    found += [Finding("ip_address", m.start(), m.end()) for m in _IPV6.finditer(text)
              if m.group().count(":") >= 2 and _public_ip(m.group())]
    seen: set[tuple[int, int]] = set()
    for region in regions:
        for m in phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.VALID):
            if (m.start, m.end) not in seen and not _identifier_at(text, m.start) \
                    and not _ARITHMETIC.search(text, max(0, m.start - 24), m.end + 24):
                seen.add((m.start, m.end))
                found.append(Finding("phone", m.start, m.end))
    return found


def find(text: str, regions: list[str]) -> list[Finding]:
    """Non-overlapping findings in text order; where two overlap, the kind earlier in KINDS wins (a card number is
    not also a phone number)."""
    rank = {k: i for i, k in enumerate(KINDS)}
    kept: list[Finding] = []
    for f in sorted(_candidates(text, regions), key=lambda f: (rank[f.kind], f.start)):
        if all(f.end <= k.start or f.start >= k.end for k in kept):
            kept.append(f)
    return sorted(kept, key=lambda f: f.start)


def redact(text: str, findings: list[Finding], kinds: set[str]) -> str:
    """text with the findings of `kinds` replaced by their placeholders."""
    out, pos = [], 0
    for f in findings:
        if f.kind in kinds:
            out += [text[pos:f.start], PLACEHOLDER[f.kind]]
            pos = f.end
    return "".join(out) + text[pos:]


def candidate_mask(texts: pl.Series) -> pl.Series:
    """True where a text may hold a finding (a cheap superset, evaluated by polars on all cores)."""
    return texts.str.contains(SCREEN).fill_null(False)


def scan(texts: list[str], p: PiiConfig) -> tuple[list[str], list[dict[str, int]]]:
    """(each text with the kinds whose action is redact replaced, per text the number of findings of each kind)."""
    redacted_kinds = {k for k in PLACEHOLDER if getattr(p, k) == "redact"}
    out, counts = list(texts), [{} for _ in texts]
    mask = candidate_mask(pl.Series(texts, dtype=pl.String)).to_list()
    for i, (text, maybe) in enumerate(zip(texts, mask)):
        if not maybe:
            continue
        findings = find(text, p.phone_regions)
        for f in findings:
            counts[i][f.kind] = counts[i].get(f.kind, 0) + 1
        if findings:
            out[i] = redact(text, findings, redacted_kinds)
    return out, counts
