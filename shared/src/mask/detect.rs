//! Content detectors: find sensitive substrings (email addresses, phone
//! numbers, payment cards, US social security numbers, IBANs, JWTs, API keys
//! and private keys) inside one value.
//!
//! Detectors protect the values that carry no column origin (expressions,
//! function results, views), so they run on every such value of every row.
//! That decides the shape of this module: one prefilter pass over the bytes
//! that usually proves nothing can match, then one left-to-right scan that
//! tries only the detectors whose first byte is under the cursor. Nothing here
//! allocates unless something matched, and nothing assumes valid UTF-8: the
//! input is whatever bytes the server sent for a text-format value.
//!
//! Numbers are judged conservatively, because ids, amounts, dates, versions
//! and timestamps must stay readable: a phone needs a `+`, parentheses or a
//! phone-shaped grouping, a card needs a known prefix and the Luhn check, an
//! IBAN needs a known country, its length and the mod-97 check. Text patterns
//! are judged generously: masking a word glued to an email address costs less
//! than leaking the address.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

/// A kind of sensitive content that can be found inside a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Detector {
    /// `local@domain.tld`; the mask keeps the domain.
    Email,
    /// International (`+44 20 7946 0958`) and common national formats.
    Phone,
    /// Payment card numbers with a known prefix that pass the Luhn check;
    /// the mask keeps the last four digits.
    Card,
    /// US social security numbers written `ddd-dd-dddd`.
    Ssn,
    /// International bank account numbers, compact or in groups of four.
    Iban,
    /// JSON web tokens (JWS, and JWE with five segments).
    Jwt,
    /// AWS access key ids (`AKIA…`, `ASIA…`).
    AwsAccessKey,
    /// GitHub tokens (`ghp_`, `gho_`, `ghu_`, `ghs_`, `ghr_`, `github_pat_`).
    GithubToken,
    /// Slack tokens (`xoxb-`, `xoxp-`, `xoxa-`, `xoxr-`, `xoxs-`).
    SlackToken,
    /// Stripe secret, restricted and publishable keys, live and test.
    StripeKey,
    /// PEM private keys, from the BEGIN line through the END line (or to the
    /// end of the value when the END line is missing).
    PrivateKey,
}

/// The names of all detectors, as configuration and error messages spell them.
const KNOWN_NAMES: &str =
    "email, phone, card, ssn, iban, jwt, aws_access_key, github_token, slack_token, stripe_key, private_key";

impl Detector {
    /// Every detector, in declaration order.
    pub const ALL: [Detector; 11] = [
        Detector::Email,
        Detector::Phone,
        Detector::Card,
        Detector::Ssn,
        Detector::Iban,
        Detector::Jwt,
        Detector::AwsAccessKey,
        Detector::GithubToken,
        Detector::SlackToken,
        Detector::StripeKey,
        Detector::PrivateKey,
    ];

    /// The stable lowercase name used in configuration and audit records.
    /// Renaming one breaks both, so these never change.
    pub const fn name(self) -> &'static str {
        match self {
            Detector::Email => "email",
            Detector::Phone => "phone",
            Detector::Card => "card",
            Detector::Ssn => "ssn",
            Detector::Iban => "iban",
            Detector::Jwt => "jwt",
            Detector::AwsAccessKey => "aws_access_key",
            Detector::GithubToken => "github_token",
            Detector::SlackToken => "slack_token",
            Detector::StripeKey => "stripe_key",
            Detector::PrivateKey => "private_key",
        }
    }

    const fn bit(self) -> u16 {
        1 << self as u16
    }

    /// Appends this detector's default mask for `matched` (the bytes it
    /// found) to `out`.
    ///
    /// - email: `****@` and the domain, which says whose system the address
    ///   belongs to without saying whose address it is;
    /// - card: every digit but the last four becomes `*`, separators stay
    ///   (`**** **** **** 1111`), as PCI DSS allows a card to be shown;
    /// - everything else: `[masked:NAME]`, with the detector's name, so a
    ///   reader knows what was there.
    pub fn write_mask(self, matched: &[u8], out: &mut Vec<u8>) {
        match self {
            Detector::Email => {
                out.extend_from_slice(b"****");
                if let Some(at) = matched.iter().rposition(|&b| b == b'@') {
                    out.extend_from_slice(&matched[at..]);
                }
            }
            Detector::Card => {
                // Copied whole, then the leading digits starred in place:
                // one copy rather than a push per byte.
                let digits = matched.iter().filter(|b| b.is_ascii_digit()).count();
                let mut hide = digits.saturating_sub(4);
                let start = out.len();
                out.extend_from_slice(matched);
                for b in &mut out[start..] {
                    if hide == 0 {
                        break;
                    }
                    if b.is_ascii_digit() {
                        *b = b'*';
                        hide -= 1;
                    }
                }
            }
            _ => {
                out.extend_from_slice(b"[masked:");
                out.extend_from_slice(self.name().as_bytes());
                out.push(b']');
            }
        }
    }
}

impl fmt::Display for Detector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Detector {
    type Err = DetectorError;

    fn from_str(name: &str) -> Result<Detector, DetectorError> {
        Detector::ALL
            .into_iter()
            .find(|detector| detector.name() == name)
            .ok_or_else(|| DetectorError::Unknown { name: name.to_owned() })
    }
}

/// Why a detector could not be named.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DetectorError {
    #[error("unknown content detector `{name}`: write one of {KNOWN_NAMES}")]
    Unknown { name: String },
}

/// A set of detectors, as enabled by configuration. Copy-cheap: one word.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct DetectorSet(u16);

impl DetectorSet {
    pub const EMPTY: DetectorSet = DetectorSet(0);
    pub const ALL: DetectorSet = DetectorSet((1 << Detector::ALL.len()) - 1);

    pub const fn with(self, detector: Detector) -> DetectorSet {
        DetectorSet(self.0 | detector.bit())
    }

    pub const fn without(self, detector: Detector) -> DetectorSet {
        DetectorSet(self.0 & !detector.bit())
    }

    pub const fn contains(self, detector: Detector) -> bool {
        self.0 & detector.bit() != 0
    }

    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn iter(self) -> impl Iterator<Item = Detector> {
        Detector::ALL
            .into_iter()
            .filter(move |&detector| self.contains(detector))
    }
}

impl FromIterator<Detector> for DetectorSet {
    fn from_iter<I: IntoIterator<Item = Detector>>(detectors: I) -> DetectorSet {
        detectors.into_iter().fold(DetectorSet::EMPTY, DetectorSet::with)
    }
}

impl fmt::Debug for DetectorSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter().map(Detector::name)).finish()
    }
}

/// One match: which detector found what, as a byte range of the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub detector: Detector,
    pub range: Range<usize>,
}

/// The findings of the `enabled` detectors in `value`, in order, never
/// overlapping. Where two detectors match at the same place the longer match
/// wins (an email address whose local part is a phone number is an email).
pub fn findings(value: &[u8], enabled: DetectorSet) -> Findings<'_> {
    let possible = if enabled.is_empty() {
        0
    } else {
        plausible(value) & enabled.0
    };
    Findings {
        value,
        pos: if possible == 0 { value.len() } else { 0 },
        last_end: 0,
        possible,
    }
}

/// `value` with every finding replaced by its detector's mask
/// ([`Detector::write_mask`]), or `None`, without allocating, when nothing
/// matched.
pub fn scrub(value: &[u8], enabled: DetectorSet) -> Option<Vec<u8>> {
    let mut found = findings(value, enabled);
    let first = found.next()?;
    let mut out = Vec::with_capacity(value.len() + 16);
    write_scrubbed(value, first, found, &mut out);
    Some(out)
}

/// Like [`scrub`], for a hot path that reuses one buffer: when something
/// matched, appends the scrubbed value to `out` and returns `true`; otherwise
/// leaves `out` untouched and returns `false`.
pub fn scrub_into(value: &[u8], enabled: DetectorSet, out: &mut Vec<u8>) -> bool {
    let mut found = findings(value, enabled);
    match found.next() {
        Some(first) => {
            write_scrubbed(value, first, found, out);
            true
        }
        None => false,
    }
}

fn write_scrubbed(value: &[u8], first: Finding, rest: Findings<'_>, out: &mut Vec<u8>) {
    let mut copied = 0;
    for finding in std::iter::once(first).chain(rest) {
        out.extend_from_slice(&value[copied..finding.range.start]);
        finding.detector.write_mask(&value[finding.range.clone()], out);
        copied = finding.range.end;
    }
    out.extend_from_slice(&value[copied..]);
}

/// The scan behind [`findings`].
#[derive(Debug, Clone)]
pub struct Findings<'a> {
    value: &'a [u8],
    /// Where the scan resumes.
    pos: usize,
    /// End of the last finding. An email's local part is found by looking
    /// back from its `@` and must not reach into an earlier finding.
    last_end: usize,
    /// Bits of the enabled detectors that the prefilter did not rule out.
    possible: u16,
}

impl Iterator for Findings<'_> {
    type Item = Finding;

    fn next(&mut self) -> Option<Finding> {
        let possible = self.possible;
        while let Some(skip) = self
            .value
            .get(self.pos..)
            .and_then(|rest| rest.iter().position(|&b| START[usize::from(b)] & possible != 0))
        {
            let i = self.pos + skip;
            let byte = self.value[i];
            // No detector starts inside a word: the ones that start with a
            // letter or digit all need something else before it.
            let is_alnum = byte.is_ascii_alphanumeric();
            let inside_word = is_alnum && prev(self.value, i).is_some_and(|b| b.is_ascii_alphanumeric());
            let mut candidates = START[usize::from(byte)] & possible;
            // Most numbers in a value (amounts, counts, dates, short ids) are
            // too short for any numeric detector: judge the whole run of
            // digit groups once and step over it, rather than walking it
            // with each detector at each of its digits. A run too short for
            // some of them only tries the others.
            if !inside_word && byte.is_ascii_digit() && numeric_start_ok(self.value, i) {
                let run = number_run(self.value, i);
                if run.digits < SSN_DIGITS {
                    self.pos = run.end;
                    continue;
                }
                if run.digits < PHONE_BARE_MIN_DIGITS || run.first_group > PHONE_BARE_MAX_FIRST_GROUP {
                    candidates &= !Detector::Phone.bit();
                }
                if run.digits < CARD_MIN_DIGITS {
                    candidates &= !Detector::Card.bit();
                }
            }
            if !inside_word && let Some(mut finding) = self.match_at(i, candidates) {
                if finding.detector != Detector::Email
                    && self.possible & Detector::Email.bit() != 0
                    && let Some(email) = self.email_over(&finding)
                {
                    finding = email;
                }
                self.pos = finding.range.end;
                self.last_end = finding.range.end;
                return Some(finding);
            }
            // For the same reason the rest of a word can be skipped.
            self.pos = i + 1;
            if is_alnum {
                self.pos += self.value[self.pos..]
                    .iter()
                    .take_while(|b| b.is_ascii_alphanumeric())
                    .count();
            }
        }
        self.pos = self.value.len();
        None
    }
}

impl Findings<'_> {
    /// The longest match of the `candidates` at `i`.
    fn match_at(&self, i: usize, mut candidates: u16) -> Option<Finding> {
        let v = self.value;
        // The numeric detectors share their first test; most digits in a
        // value (the `01` of `2024-01-15`) fail it.
        const NUMERIC: u16 = Detector::Phone.bit() | Detector::Card.bit() | Detector::Ssn.bit();
        if candidates & NUMERIC != 0 && !numeric_start_ok(v, i) {
            candidates &= !NUMERIC;
            if candidates == 0 {
                return None;
            }
        }
        let mut best: Option<Finding> = None;
        let mut offer = |detector: Detector, range: Option<Range<usize>>| {
            if let Some(range) = range
                && best.as_ref().is_none_or(|b| range.end > b.range.end)
            {
                best = Some(Finding { detector, range });
            }
        };
        let has = |detector: Detector| candidates & detector.bit() != 0;
        let from_i = |end: Option<usize>| end.map(|end| i..end);
        if has(Detector::Email) {
            offer(Detector::Email, email_at(v, i, self.last_end));
        }
        if has(Detector::Phone) {
            offer(Detector::Phone, from_i(phone_at(v, i)));
        }
        if has(Detector::Card) {
            offer(Detector::Card, from_i(card_at(v, i)));
        }
        if has(Detector::Ssn) {
            offer(Detector::Ssn, from_i(ssn_at(v, i)));
        }
        if has(Detector::Iban) {
            offer(Detector::Iban, from_i(iban_at(v, i)));
        }
        if has(Detector::Jwt) {
            offer(Detector::Jwt, from_i(jwt_at(v, i)));
        }
        for (detector, kinds) in TOKENS {
            if has(*detector) {
                offer(*detector, from_i(token_at(v, i, kinds)));
            }
        }
        if has(Detector::PrivateKey) {
            offer(Detector::PrivateKey, from_i(private_key_at(v, i)));
        }
        best
    }

    /// An email address whose local part holds `finding`
    /// (`415-555-0100@sms.example.com`, `123-45-6789.jd@example.com`). The
    /// scan meets the other match first, but the address is longer and wins.
    fn email_over(&self, finding: &Finding) -> Option<Finding> {
        let v = self.value;
        let after = finding.range.end;
        let at = after
            + v[after..]
                .iter()
                .take(LOCAL_MAX)
                .take_while(|&&b| is_local_ascii(b))
                .count();
        if v.get(at) != Some(&b'@') {
            return None;
        }
        let range = email_at(v, at, self.last_end)?;
        (range.start <= finding.range.start).then_some(Finding {
            detector: Detector::Email,
            range,
        })
    }
}

// Byte classes for the prefilter. `DIGIT` must stay 1: digits are counted by
// adding the class bit.
const DIGIT: u8 = 1;
const AT: u8 = 2;
const DOT: u8 = 4;
const DASH: u8 = 8;
const UNDERSCORE: u8 = 16;
const UPPER: u8 = 32;
/// `J`, which every JWT holds (`eyJ`) and little else does.
const JAY: u8 = 64;
/// `A`, which begins every AWS access key id.
const ACE: u8 = 128;

const CLASS: [u8; 256] = {
    let mut table = [0; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = match b as u8 {
            b'0'..=b'9' => DIGIT,
            b'@' => AT,
            b'.' => DOT,
            b'-' => DASH,
            b'_' => UNDERSCORE,
            b'A' => UPPER | ACE,
            b'J' => UPPER | JAY,
            b'B'..=b'I' | b'K'..=b'Z' => UPPER,
            _ => 0,
        };
        b += 1;
    }
    table
};

/// The fewest digits of any phone number the phone detector accepts.
const PHONE_MIN_DIGITS: usize = 8;

/// The detectors that could match somewhere in `value`, judged from which
/// byte classes occur and how many digits there are. One pass over the
/// bytes, then two table lookups; for most values (names, words, small
/// numbers) the answer is none.
fn plausible(value: &[u8]) -> u16 {
    let mut classes = 0;
    let mut digits = 0usize;
    for &b in value {
        let class = CLASS[usize::from(b)];
        classes |= class;
        digits += usize::from(class & DIGIT);
    }
    PLAUSIBLE_BY_CLASSES[usize::from(classes)] & PLAUSIBLE_BY_DIGITS[digits.min(PLAUSIBLE_BY_DIGITS.len() - 1)]
}

/// The detectors that could match in a value with these byte `classes` and
/// this many `digits`. Each detector's condition is one on the classes and
/// one on the digits, so [`plausible`] looks the two halves up in tables
/// built from this.
const fn plausible_for(classes: u8, digits: usize) -> u16 {
    let mut set = DetectorSet::EMPTY;
    if has_classes(classes, AT | DOT) {
        set = set.with(Detector::Email);
    }
    if digits >= PHONE_MIN_DIGITS {
        set = set.with(Detector::Phone);
    }
    if digits >= CARD_MIN_DIGITS {
        set = set.with(Detector::Card);
    }
    if digits >= SSN_DIGITS && has_classes(classes, DASH) {
        set = set.with(Detector::Ssn);
    }
    // Two check digits and a country code at least.
    if digits >= 2 && has_classes(classes, UPPER) {
        set = set.with(Detector::Iban);
    }
    if has_classes(classes, DOT | JAY) {
        set = set.with(Detector::Jwt);
    }
    if has_classes(classes, ACE) {
        set = set.with(Detector::AwsAccessKey);
    }
    if has_classes(classes, UNDERSCORE) {
        set = set.with(Detector::GithubToken).with(Detector::StripeKey);
    }
    if has_classes(classes, DASH) {
        set = set.with(Detector::SlackToken).with(Detector::PrivateKey);
    }
    set.0
}

/// Whether `classes` holds every class bit of `class`.
const fn has_classes(classes: u8, class: u8) -> bool {
    classes & class == class
}

/// [`plausible_for`] with any number of digits, by byte classes.
const PLAUSIBLE_BY_CLASSES: [u16; 256] = {
    let mut table = [0; 256];
    let mut classes = 0;
    while classes < 256 {
        table[classes] = plausible_for(classes as u8, usize::MAX);
        classes += 1;
    }
    table
};

/// [`plausible_for`] with every byte class, by digit count; the last entry
/// stands for every count from the largest threshold (a card's) on.
const PLAUSIBLE_BY_DIGITS: [u16; CARD_MIN_DIGITS + 1] = {
    let mut table = [0; CARD_MIN_DIGITS + 1];
    let mut digits = 0;
    while digits <= CARD_MIN_DIGITS {
        table[digits] = plausible_for(u8::MAX, digits);
        digits += 1;
    }
    table
};

/// For each byte, the detectors whose match can begin there (for email, the
/// `@` its match is anchored on).
const START: [u16; 256] = {
    let mut table = [0; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = match b as u8 {
            b'@' => Detector::Email.bit(),
            b'+' | b'(' => Detector::Phone.bit(),
            b'0'..=b'9' => Detector::Phone.bit() | Detector::Card.bit() | Detector::Ssn.bit(),
            b'A' => Detector::Iban.bit() | Detector::AwsAccessKey.bit(),
            b'B'..=b'Z' => Detector::Iban.bit(),
            b'e' => Detector::Jwt.bit(),
            b'g' => Detector::GithubToken.bit(),
            b'x' => Detector::SlackToken.bit(),
            b'p' | b'r' | b's' => Detector::StripeKey.bit(),
            b'-' => Detector::PrivateKey.bit(),
            _ => 0,
        };
        b += 1;
    }
    table
};

fn prev(v: &[u8], i: usize) -> Option<u8> {
    i.checked_sub(1).and_then(|p| v.get(p).copied())
}

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// Punctuation that joins the parts of one number: `2024-01-15`,
/// `192.168.1.1`, `1,000`, `1/2`, `10:30`.
fn joins_numbers(b: u8) -> bool {
    matches!(b, b'-' | b'.' | b',' | b'/' | b':' | b'+')
}

/// Whether a number may begin at `i`: not inside a word, and not the
/// continuation of another number (`-4111…` is fine, `12-4111…` is not).
fn numeric_start_ok(v: &[u8], i: usize) -> bool {
    match prev(v, i) {
        None => true,
        Some(b) if is_word(b) => false,
        // A comma between numbers separates fields (CSV, records, arrays,
        // JSON) unless it is a thousands separator.
        Some(b',') => !thousands_comma(v, i - 1),
        Some(b) if joins_numbers(b) => !prev(v, i - 1).is_some_and(|b| b.is_ascii_digit()),
        Some(_) => true,
    }
}

/// The digits of an SSN, the fewest of any number the numeric detectors
/// accept when it begins with a digit.
const SSN_DIGITS: usize = 9;
/// The fewest digits of a phone number written without `+` or parentheses
/// (`415-555-0100`, `020 7946 0958`).
const PHONE_BARE_MIN_DIGITS: usize = 10;
/// The fewest digits of a payment card.
const CARD_MIN_DIGITS: usize = 13;

/// The longest first group of a phone number written without `+` or
/// parentheses: a trunk-zero area code (`01234 567890`). A longer one is an
/// unbroken run of digits (a card, an id).
const PHONE_BARE_MAX_FIRST_GROUP: usize = 5;

/// What [`number_run`] saw of a run of digit groups.
struct NumberRun {
    /// Its digits, counted up to [`CARD_MIN_DIGITS`].
    digits: usize,
    /// The digits of its first group, counted as far.
    first_group: usize,
    /// Where the counting stopped: the end of the run when it has fewer
    /// digits than that.
    end: usize,
}

/// The run of digit groups at `i` joined by single spaces, dashes or dots
/// (the widest grouping any numeric detector reads from a digit), its digits
/// counted up to [`CARD_MIN_DIGITS`] so that a long run costs no more.
///
/// A run of fewer than [`SSN_DIGITS`] is passed over whole: no phone, card
/// or SSN can begin at `i`, nor at any later digit of the run (those see a
/// part of it), and no other detector begins inside it, since its only other
/// bytes are separators followed by a digit and a private key begins with
/// five dashes.
fn number_run(v: &[u8], i: usize) -> NumberRun {
    let mut digits = 0;
    let mut first_group = None;
    let mut p = i;
    loop {
        while digits < CARD_MIN_DIGITS
            && let Some(b) = v.get(p)
            && b.is_ascii_digit()
        {
            digits += 1;
            p += 1;
        }
        let first_group = *first_group.get_or_insert(digits);
        match v.get(p) {
            Some(b' ' | b'-' | b'.') if digits < CARD_MIN_DIGITS && v.get(p + 1).is_some_and(u8::is_ascii_digit) => {
                p += 1
            }
            _ => {
                return NumberRun {
                    digits,
                    first_group,
                    end: p,
                };
            }
        }
    }
}

/// Whether the comma at `comma` is a thousands separator: the number around
/// it is written `1,234,567` (one to three digits, groups of exactly three
/// after each comma, perhaps a decimal part) and is not joined to more
/// digits on either side. Anything else is a comma between fields: a
/// record, an array or a CSV line prints `(5555555555554444,100)` and
/// `(937-11-7919,100)`, and whoever writes the query chooses the field
/// that follows a sensitive number.
fn thousands_comma(v: &[u8], comma: usize) -> bool {
    let digits_before = |end: usize| v[..end].iter().rev().take_while(|b| b.is_ascii_digit()).count();
    // Back: groups of three after commas, then a leading group of one to
    // three digits that does not end another number (`+33 1 23 45 67 89`).
    let mut end = comma;
    loop {
        let n = digits_before(end);
        if n == 0 || n > 3 {
            return false;
        }
        let start = end - n;
        if start >= 2 && v[start - 1] == b',' && v[start - 2].is_ascii_digit() {
            if n != 3 {
                return false;
            }
            end = start - 1;
            continue;
        }
        if start >= 2 && separates_groups(v[start - 1]) && v[start - 2].is_ascii_digit() {
            return false;
        }
        break;
    }
    // Forward: groups of exactly three after each comma, then perhaps a
    // decimal part, and no more digits joined on.
    let mut at = comma;
    while v.get(at) == Some(&b',') && v.get(at + 1).is_some_and(u8::is_ascii_digit) {
        if !v.get(at + 1..at + 4).is_some_and(|d| d.iter().all(u8::is_ascii_digit))
            || v.get(at + 4).is_some_and(u8::is_ascii_digit)
        {
            return false;
        }
        at += 4;
    }
    if v.get(at) == Some(&b'.') && v.get(at + 1).is_some_and(u8::is_ascii_digit) {
        at += 1;
        while v.get(at).is_some_and(u8::is_ascii_digit) {
            at += 1;
        }
    }
    !(v.get(at).is_some_and(|&b| separates_groups(b)) && v.get(at + 1).is_some_and(u8::is_ascii_digit))
}

/// What may stand between the digit groups of one number: [`joins_numbers`]
/// punctuation, a space, or the parentheses around an area code.
fn separates_groups(b: u8) -> bool {
    joins_numbers(b) || matches!(b, b' ' | b'(' | b')')
}

/// Whether a number may end at `end`: not inside a word, and not followed by
/// more of a number (a decimal part, the rest of a date or address). A space
/// followed by digits is allowed: numbers are written next to each other.
fn numeric_end_ok(v: &[u8], end: usize) -> bool {
    match v.get(end) {
        None => true,
        Some(&b) if is_word(b) => false,
        Some(b',') => !thousands_comma(v, end),
        Some(&b) if joins_numbers(b) => !v.get(end + 1).is_some_and(u8::is_ascii_digit),
        Some(_) => true,
    }
}

/// Most digit groups any detector looks at: a 19-digit card in threes needs
/// six, and longer runs of short groups are lists of numbers, not one number.
const MAX_GROUPS: usize = 8;

/// A run of digit groups such as `+1 (415) 555-0100` or `4111 1111 1111 1111`,
/// as seen at the end of one of its groups.
#[derive(Debug, Default)]
struct Groups {
    /// Just past the group (past its `)` if parenthesised).
    end: usize,
    digits: usize,
    count: usize,
    /// Where each group's digits begin.
    starts: [usize; MAX_GROUPS],
    lengths: [usize; MAX_GROUPS],
    /// Separator kinds seen, as [`separator_bit`]s.
    separators: u8,
    /// Separator kinds seen between groups of a phone's subscriber part:
    /// not after a country code and not around parentheses, where numbers
    /// written `+1 (415) 555-0100` change separator.
    inner_separators: u8,
    /// Which group was written in parentheses, if one was.
    paren: Option<usize>,
}

impl Groups {
    fn lens(&self) -> &[usize] {
        &self.lengths[..self.count]
    }

    fn single_separator(&self) -> bool {
        self.separators.count_ones() == 1
    }

    /// One kind of separator inside the subscriber part. A change of
    /// separator means the next group is another number:
    /// `+1 415-555-0100 4111` is a phone and then something else.
    fn consistent_inside(&self) -> bool {
        self.inner_separators.count_ones() <= 1
    }
}

fn separator_bit(b: u8) -> u8 {
    match b {
        b' ' => 1,
        b'-' => 2,
        b'.' => 4,
        _ => 8,
    }
}

/// Walks the digit groups that begin at `start`, separated by one byte of
/// `separators` (or, if `parens`, with one group written `(415)`), calling
/// `visit` at the end of each group. Stops after `max_digits` digits or
/// [`MAX_GROUPS`] groups, so one call costs a bounded amount of work however
/// long the run of digits.
fn walk_groups(
    v: &[u8],
    start: usize,
    separators: &[u8],
    parens: bool,
    max_digits: usize,
    mut visit: impl FnMut(&Groups),
) {
    let mut g = Groups::default();
    let mut p = start;
    while g.count < MAX_GROUPS {
        let paren = parens && g.paren.is_none() && v.get(p) == Some(&b'(');
        let digits_at = if paren { p + 1 } else { p };
        let run = v
            .get(digits_at..)
            .unwrap_or_default()
            .iter()
            .take(max_digits - g.digits + 1)
            .take_while(|b| b.is_ascii_digit())
            .count();
        g.digits += run;
        if run == 0 || g.digits > max_digits {
            return;
        }
        let mut end = digits_at + run;
        if paren {
            if v.get(end) != Some(&b')') {
                return;
            }
            end += 1;
            g.paren = Some(g.count);
        }
        g.starts[g.count] = digits_at;
        g.lengths[g.count] = run;
        g.count += 1;
        g.end = end;
        visit(&g);

        let opens_group = |b: Option<&u8>| b.is_some_and(|&b| b.is_ascii_digit() || (parens && b == b'('));
        match v.get(end) {
            Some(&s) if separators.contains(&s) && opens_group(v.get(end + 1)) => {
                g.separators |= separator_bit(s);
                if g.count >= 2 && !paren && v.get(end + 1) != Some(&b'(') {
                    g.inner_separators |= separator_bit(s);
                }
                p = end + 1;
            }
            // `+44 (0)20 7946 0958`: digits may follow a `)` directly.
            Some(b) if paren && b.is_ascii_digit() => p = end,
            _ => return,
        }
    }
}

/// Phone numbers: `+` forms (E.164 with any grouping), `(415) 555-0100`, and
/// two national shapes without either: North American `415-555-0100`
/// (optionally `1-` first) and trunk-zero numbers like `020 7946 0958`.
/// A bare run of digits is never a phone: it is far more often an id.
fn phone_at(v: &[u8], i: usize) -> Option<usize> {
    if !numeric_start_ok(v, i) {
        return None;
    }
    let mut best = None;
    match v[i] {
        b'+' => {
            if !v.get(i + 1).is_some_and(|b| matches!(b, b'1'..=b'9')) {
                return None;
            }
            // Country code 1 is North America's, where every number has ten
            // digits after it.
            let north_american = v[i + 1] == b'1';
            walk_groups(v, i + 1, b" -.", true, 15, |g| {
                let digits_ok = match g.count {
                    1 => g.digits >= 10,
                    // Two groups joined by a dot look like a decimal number.
                    2 => g.digits >= 10 && g.separators & separator_bit(b'.') == 0,
                    _ => g.digits >= PHONE_MIN_DIGITS,
                };
                let digits_ok = digits_ok && (!north_american || g.digits == 11);
                let groups_ok = g.count == 1 || g.lens().iter().all(|&len| len <= 8);
                let shape_ok = groups_ok && g.consistent_inside() && g.paren != Some(g.count - 1);
                // After a `+` number, even `-12` is more likely an extension
                // than more of the same number: only a word may not follow.
                if digits_ok && shape_ok && !v.get(g.end).copied().is_some_and(is_word) {
                    best = Some(g.end);
                }
            });
        }
        b'(' => walk_groups(v, i, b" -.", true, 12, |g| {
            let area_ok = g.paren == Some(0) && (2..=5).contains(&g.lengths[0]);
            let rest_ok =
                g.count >= 2 && g.lens()[1..].iter().all(|len| (2..=8).contains(len)) && g.consistent_inside();
            let digits_ok = g.digits >= if g.count == 2 { 10 } else { 9 };
            if area_ok && rest_ok && digits_ok && numeric_end_ok(v, g.end) {
                best = Some(g.end);
            }
        }),
        _ => walk_groups(v, i, b" -.", false, 15, |g| {
            if (north_american(v, g) || trunk_zero(v, g)) && numeric_end_ok(v, g.end) {
                best = Some(g.end);
            }
        }),
    }
    best
}

/// `415-555-0100`, `415.555.0100`, `1-800-555-0199`: one kind of separator,
/// area code and exchange not starting with 0 or 1.
fn north_american(v: &[u8], g: &Groups) -> bool {
    let (area, shape_ok) = match g.lens() {
        [3, 3, 4] => (0, true),
        [1, 3, 3, 4] => (1, v[g.starts[0]] == b'1'),
        _ => return false,
    };
    let leads_ok = |group: usize| matches!(v[g.starts[group]], b'2'..=b'9');
    shape_ok && g.single_separator() && leads_ok(area) && leads_ok(area + 1)
}

/// National numbers with a trunk `0`: `020 7946 0958`, `01 23 45 67 89`,
/// `0412 345 678`, `06-12345678`. Ten or eleven digits, so that dates
/// (`01-15-2024`) and ZIP+4 codes (`02134-1234`) stay out.
fn trunk_zero(v: &[u8], g: &Groups) -> bool {
    let lens = g.lens();
    v[g.starts[0]] == b'0'
        && v.get(g.starts[0] + 1) != Some(&b'0')
        && lens.len() >= 2
        && g.single_separator()
        && (10..=11).contains(&g.digits)
        && (2..=5).contains(&lens[0])
        && lens.iter().all(|len| (2..=8).contains(len))
}

/// Payment cards: 13 to 19 digits, either unbroken or in groups (the first of
/// four digits, the others of three to six, one kind of separator), with a
/// known issuer prefix and a valid Luhn check digit. Where groups go on after
/// a card (`4111 1111 1111 1111 12/25`), the longest valid prefix is the card.
fn card_at(v: &[u8], i: usize) -> Option<usize> {
    if !numeric_start_ok(v, i) {
        return None;
    }
    let mut best = None;
    walk_groups(v, i, b" -", false, 19, |g| {
        let lens = g.lens();
        let shaped = lens.len() == 1
            || (lens[0] == 4 && lens[1..].iter().all(|len| (3..=6).contains(len)) && g.single_separator());
        if shaped && (13..=19).contains(&g.digits) && numeric_end_ok(v, g.end) {
            let number = &v[i..g.end];
            if issuer_known(number, g.digits) && luhn(number) {
                best = Some(g.end);
            }
        }
    });
    best
}

/// The Luhn check over the digits of `number`, separators skipped.
fn luhn(number: &[u8]) -> bool {
    // Each digit doubled, its digits summed (`7` → 14 → 5).
    const DOUBLED: [u32; 10] = [0, 2, 4, 6, 8, 1, 3, 5, 7, 9];
    let mut sum = 0;
    let mut double = false;
    for &b in number.iter().rev() {
        if b.is_ascii_digit() {
            let d = b - b'0';
            sum += if double { DOUBLED[usize::from(d)] } else { u32::from(d) };
            double = !double;
        }
    }
    sum % 10 == 0
}

/// Whether the first digits of `number` belong to a card network that issues
/// numbers of `len` digits: Visa, Mastercard, American Express, Diners, JCB,
/// Discover, UnionPay, Maestro, Mir. Timestamps (`1712…`) and most ids do not.
fn issuer_known(number: &[u8], len: usize) -> bool {
    let prefix = number
        .iter()
        .filter(|b| b.is_ascii_digit())
        .take(4)
        .fold(0, |acc, b| acc * 10 + u32::from(b - b'0'));
    let (p1, p2, p3) = (prefix / 1000, prefix / 100, prefix / 10);
    match p1 {
        2 => (2221..=2720).contains(&prefix) && len == 16 || (2200..=2204).contains(&prefix) && len >= 16,
        3 => {
            matches!(p2, 34 | 37) && len == 15
                || (matches!(p2, 36 | 38 | 39) || (300..=305).contains(&p3)) && len >= 14
                || (3528..=3589).contains(&prefix) && len >= 16
        }
        4 => matches!(len, 13 | 16 | 19),
        5 => (51..=55).contains(&p2) && len == 16 || matches!(p2, 50 | 56..=59),
        6 => true,
        _ => false,
    }
}

/// US social security numbers and ITINs, `ddd-dd-dddd` only: without the
/// dashes nine digits are far more often an id. Area 900–999 is never an SSN
/// but is the IRS's individual taxpayer number (ITIN), just as sensitive, so
/// it is matched; numbers of neither kind (area 000 or 666, group 00, serial
/// 0000) are not.
fn ssn_at(v: &[u8], i: usize) -> Option<usize> {
    let s = v.get(i..i + 11)?;
    let shaped = s.iter().enumerate().all(|(k, &b)| {
        if k == 3 || k == 6 {
            b == b'-'
        } else {
            b.is_ascii_digit()
        }
    });
    if !shaped || !numeric_start_ok(v, i) || !numeric_end_ok(v, i + 11) {
        return None;
    }
    let number = |digits: &[u8]| digits.iter().fold(0, |acc, b| acc * 10 + u32::from(b - b'0'));
    let (area, group, serial) = (number(&s[0..3]), number(&s[4..6]), number(&s[7..11]));
    let issued = area != 0 && area != 666 && group != 0 && serial != 0;
    issued.then_some(i + 11)
}

/// IBANs: a known country code, two check digits, and the country's length
/// of uppercase letters and digits, compact or with a space after every four
/// characters; the mod-97 check must hold. Lowercase IBANs are not matched.
fn iban_at(v: &[u8], i: usize) -> Option<usize> {
    if prev(v, i).is_some_and(|b| b.is_ascii_alphanumeric()) {
        return None;
    }
    let head = v.get(i..i + 4)?;
    if !head[2].is_ascii_digit() || !head[3].is_ascii_digit() {
        return None;
    }
    let len = iban_length([head[0], head[1]])?;
    let mut chars = [0u8; 34];
    let mut count = 0;
    let mut p = i;
    let is_char = |b: &u8| b.is_ascii_uppercase() || b.is_ascii_digit();
    while count < len {
        match v.get(p) {
            Some(b) if is_char(b) => {
                chars[count] = *b;
                count += 1;
                p += 1;
            }
            Some(b' ') if count % 4 == 0 && v.get(p + 1).is_some_and(is_char) => p += 1,
            _ => return None,
        }
    }
    if v.get(p).is_some_and(|b| b.is_ascii_alphanumeric()) {
        return None;
    }
    // The check: move the first four characters to the end, read letters as
    // 10..=35, and the whole as a decimal number must be 1 modulo 97.
    let remainder = chars[4..len].iter().chain(&chars[..4]).fold(0u32, |acc, &b| {
        if b.is_ascii_digit() {
            (acc * 10 + u32::from(b - b'0')) % 97
        } else {
            (acc * 100 + u32::from(b - b'A') + 10) % 97
        }
    });
    (remainder == 1).then_some(p)
}

/// IBAN length by country, from the SWIFT IBAN registry.
fn iban_length(country: [u8; 2]) -> Option<usize> {
    Some(match &country {
        b"NO" => 15,
        b"BE" => 16,
        b"DK" | b"FI" | b"FK" | b"FO" | b"GL" | b"NL" | b"SD" => 18,
        b"MK" | b"SI" => 19,
        b"AT" | b"BA" | b"EE" | b"KZ" | b"LT" | b"LU" | b"MN" | b"XK" => 20,
        b"CH" | b"HR" | b"LI" | b"LV" => 21,
        b"BG" | b"BH" | b"CR" | b"DE" | b"GB" | b"GE" | b"IE" | b"ME" | b"RS" | b"VA" => 22,
        b"AE" | b"GI" | b"IL" | b"IQ" | b"OM" | b"SO" | b"TL" => 23,
        b"AD" | b"CZ" | b"ES" | b"MD" | b"PK" | b"RO" | b"SA" | b"SE" | b"SK" | b"TN" | b"VG" => 24,
        b"LY" | b"PT" | b"ST" => 25,
        b"IS" | b"TR" => 26,
        b"BI" | b"DJ" | b"FR" | b"GR" | b"IT" | b"MC" | b"MR" | b"SM" => 27,
        b"AL" | b"AZ" | b"BY" | b"CY" | b"DO" | b"GT" | b"HU" | b"LB" | b"NI" | b"PL" | b"SV" => 28,
        b"BR" | b"EG" | b"PS" | b"QA" | b"UA" => 29,
        b"JO" | b"KW" | b"MU" | b"YE" => 30,
        b"MT" | b"SC" => 31,
        b"LC" => 32,
        b"RU" => 33,
        _ => return None,
    })
}

fn is_base64url(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

/// JWTs: base64url segments joined by dots, the header starting `eyJ` (the
/// encoding of `{"`). Three segments for a signed token (the signature may be
/// empty for `alg: none`), five for an encrypted one.
fn jwt_at(v: &[u8], i: usize) -> Option<usize> {
    if !v[i..].starts_with(b"eyJ") || prev(v, i).is_some_and(|b| is_base64url(b) || b == b'.') {
        return None;
    }
    let segment = |from: usize| {
        v.get(from..)
            .unwrap_or_default()
            .iter()
            .take_while(|&&b| is_base64url(b))
            .count()
    };
    let header = segment(i);
    let payload_at = i + header + 1;
    if header < 10 || v.get(payload_at - 1) != Some(&b'.') {
        return None;
    }
    let payload = segment(payload_at);
    let signature_at = payload_at + payload + 1;
    if payload < 2 || v.get(signature_at - 1) != Some(&b'.') {
        return None;
    }
    let mut end = signature_at + segment(signature_at);
    for _ in 0..2 {
        let more = if v.get(end) == Some(&b'.') { segment(end + 1) } else { 0 };
        if more == 0 {
            break;
        }
        end += 1 + more;
    }
    Some(end)
}

/// A family of tokens recognised by a literal prefix and a body.
struct TokenKind {
    prefixes: &'static [&'static [u8]],
    body: fn(u8) -> bool,
    /// Shortest and longest body; outside these it is some other word.
    min: usize,
    max: usize,
}

fn is_upper_alnum(b: u8) -> bool {
    b.is_ascii_uppercase() || b.is_ascii_digit()
}

fn is_alnum(b: u8) -> bool {
    b.is_ascii_alphanumeric()
}

fn is_alnum_dash(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-'
}

/// Prefixed secrets. Bodies are bounded below so that prose mentioning a
/// prefix (`ghp_ tokens`) is not masked, and GitHub's bound above leaves room
/// for its announced longer tokens.
const TOKENS: &[(Detector, &[TokenKind])] = &[
    (
        Detector::AwsAccessKey,
        &[TokenKind {
            prefixes: &[b"AKIA", b"ASIA"],
            body: is_upper_alnum,
            min: 16,
            max: 16,
        }],
    ),
    (
        Detector::GithubToken,
        &[
            TokenKind {
                prefixes: &[b"ghp_", b"gho_", b"ghu_", b"ghs_", b"ghr_"],
                body: is_alnum,
                min: 30,
                max: 251,
            },
            TokenKind {
                prefixes: &[b"github_pat_"],
                body: is_word,
                min: 40,
                max: 251,
            },
        ],
    ),
    (
        Detector::SlackToken,
        &[TokenKind {
            prefixes: &[b"xoxb-", b"xoxp-", b"xoxa-", b"xoxr-", b"xoxs-"],
            body: is_alnum_dash,
            min: 10,
            max: 255,
        }],
    ),
    (
        Detector::StripeKey,
        &[TokenKind {
            prefixes: &[
                b"sk_live_",
                b"sk_test_",
                b"rk_live_",
                b"rk_test_",
                b"pk_live_",
                b"pk_test_",
            ],
            body: is_alnum,
            min: 16,
            max: 255,
        }],
    ),
];

/// A prefixed token beginning at `i`, standing as a word of its own.
fn token_at(v: &[u8], i: usize, kinds: &[TokenKind]) -> Option<usize> {
    if prev(v, i).is_some_and(is_word) {
        return None;
    }
    let rest = &v[i..];
    kinds.iter().find_map(|kind| {
        let prefix = kind.prefixes.iter().find(|prefix| rest.starts_with(prefix))?;
        let body_at = i + prefix.len();
        let body = v[body_at..]
            .iter()
            .take(kind.max + 1)
            .take_while(|&&b| (kind.body)(b))
            .count();
        let end = body_at + body;
        ((kind.min..=kind.max).contains(&body) && !v.get(end).copied().is_some_and(is_word)).then_some(end)
    })
}

/// PEM private keys of any kind (`RSA`, `EC`, `OPENSSH`, `ENCRYPTED`, PGP's
/// `PRIVATE KEY BLOCK`), through the END line. Without one the rest of the
/// value is masked: a truncated key is still a key.
fn private_key_at(v: &[u8], i: usize) -> Option<usize> {
    const BEGIN: &[u8] = b"-----BEGIN ";
    const END: &[u8] = b"-----END ";
    const DASHES: &[u8] = b"-----";
    if !v[i..].starts_with(BEGIN) || prev(v, i) == Some(b'-') {
        return None;
    }
    let label_at = i + BEGIN.len();
    let label_len = v[label_at..]
        .iter()
        .take(64)
        .take_while(|&&b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b' ')
        .count();
    let body = label_at + label_len + DASHES.len();
    if !v[label_at + label_len..].starts_with(DASHES)
        || position(&v[label_at..label_at + label_len], b"PRIVATE KEY").is_none()
    {
        return None;
    }
    let end = position(&v[body..], END)
        .map(|k| body + k + END.len())
        .and_then(|end_label| position(&v[end_label..], DASHES).map(|k| end_label + k + DASHES.len()))
        .unwrap_or(v.len());
    Some(end)
}

/// Where `needle` first occurs in `haystack`.
fn position(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|window| window == needle)
}

/// The longest local part RFC 5321 allows, in bytes.
const LOCAL_MAX: usize = 64;

/// Characters of a local part: RFC 5322's atext without `/`, `=`, `?` and `&`,
/// which in practice join an address to the URL or query around it.
fn is_local_ascii(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%'*+-.^_`{|}~".contains(&b)
}

/// An email address around the `@` at `at`. The local part is found looking
/// back (at most [`LOCAL_MAX`] bytes, never into the previous finding at
/// `floor`), and may hold non-ASCII letters; leading dots and quotes are
/// punctuation around the address, not part of it. The domain needs at least
/// two labels and a top-level label of letters (or `xn--` punycode).
fn email_at(v: &[u8], at: usize, floor: usize) -> Option<Range<usize>> {
    let mut start = at;
    while start > floor && at - start < LOCAL_MAX {
        let b = v[start - 1];
        if is_local_ascii(b) {
            start -= 1;
        } else if let Some((c, len)) = char_before(v, start)
            && c.is_alphanumeric()
            && start - len >= floor
            && at - (start - len) <= LOCAL_MAX
        {
            start -= len;
        } else {
            break;
        }
    }
    while start < at && matches!(v[start], b'.' | b'\'') {
        start += 1;
    }
    if start == at {
        return None;
    }
    domain_end(v, at + 1).map(|end| start..end)
}

/// The end of the longest domain name at `start` that ends in a top-level
/// label; trailing dots and hyphens are left to the sentence around it.
fn domain_end(v: &[u8], start: usize) -> Option<usize> {
    let mut p = start;
    let mut labels = 0;
    let mut best = None;
    loop {
        let label_at = p;
        loop {
            match v.get(p) {
                Some(b) if b.is_ascii_alphanumeric() || *b == b'-' => p += 1,
                Some(_) => match char_at(v, p) {
                    Some((c, len)) if c.is_alphanumeric() => p += len,
                    _ => break,
                },
                None => break,
            }
        }
        let label = &v[label_at..p];
        // `jane@example.com-` or `…com--Jane`: a dash after the top-level
        // label belongs to the text, not to the domain.
        let letters = label.iter().take_while(|b| b.is_ascii_alphabetic()).count();
        if labels >= 1 && letters >= 2 && label.get(letters) == Some(&b'-') {
            best = Some(label_at + letters);
        }
        if label.is_empty() || label.len() > 63 || label[0] == b'-' || label[label.len() - 1] == b'-' || p - start > 253
        {
            return best;
        }
        labels += 1;
        if labels >= 2 && is_top_level(label) {
            best = Some(p);
        }
        if v.get(p) != Some(&b'.') {
            return best;
        }
        p += 1;
    }
}

fn is_top_level(label: &[u8]) -> bool {
    // Nearly every top-level label is ASCII letters, which needs no UTF-8
    // decoding; anything else takes the general test.
    if label.len() >= 2 && label.iter().all(u8::is_ascii_alphabetic) {
        return true;
    }
    label.starts_with(b"xn--")
        || std::str::from_utf8(label).is_ok_and(|s| s.chars().count() >= 2 && s.chars().all(char::is_alphabetic))
}

/// The multi-byte UTF-8 character starting at `p`, with its length; `None`
/// for ASCII, invalid or truncated sequences.
fn char_at(v: &[u8], p: usize) -> Option<(char, usize)> {
    let len = match v.get(p)? {
        0xC2..=0xDF => 2,
        0xE0..=0xEF => 3,
        0xF0..=0xF4 => 4,
        _ => return None,
    };
    let c = std::str::from_utf8(v.get(p..p + len)?).ok()?.chars().next()?;
    Some((c, len))
}

/// The multi-byte UTF-8 character ending just before `end`, with its length.
fn char_before(v: &[u8], end: usize) -> Option<(char, usize)> {
    let mut lead = end.checked_sub(1)?;
    while v[lead] & 0xC0 == 0x80 {
        if end - lead == 4 {
            return None;
        }
        lead = lead.checked_sub(1)?;
    }
    char_at(v, lead).filter(|&(_, len)| lead + len == end)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tokens are assembled with `concat!` so that this file does not itself
    /// look like a leaked secret to scanners (GitHub push protection blocks
    /// pushes containing realistic Slack and Stripe keys).
    const AWS_KEY: &str = concat!("AKIA", "IOSFODNN7EXAMPLE");
    const GITHUB_TOKEN: &str = concat!("ghp_", "aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789");
    const GITHUB_PAT: &str = concat!(
        "github_pat_",
        "11ABCDEFG0123456789abc_",
        "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVW"
    );
    const SLACK_TOKEN: &str = concat!("xox", "b-", "123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx");
    const STRIPE_KEY: &str = concat!("sk_", "live_", "4eC39HqLyjWDarjtT1zdp7dc");
    const JWT: &str = concat!(
        "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9",
        ".eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ",
        ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
    );
    const PEM: &str = concat!(
        "-----BEGIN ",
        "RSA PRIVATE KEY-----\n",
        "MIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gun\n",
        "VTLw7onLRnrq0/IzW7yWR7QkrmBL7jTKEn5u+qKhbwKfBstIs+bMY2Zkp18gnTxK\n",
        "-----END RSA PRIVATE KEY-----"
    );

    /// Every finding in `value` with all detectors on, as the text it covers.
    /// Slicing the `&str` also checks that findings fall on char boundaries.
    fn found(value: &str) -> Vec<(Detector, &str)> {
        findings(value.as_bytes(), DetectorSet::ALL)
            .map(|finding| (finding.detector, &value[finding.range]))
            .collect()
    }

    fn found_by(value: &str, detector: Detector) -> Vec<&str> {
        findings(value.as_bytes(), DetectorSet::EMPTY.with(detector))
            .map(|finding| &value[finding.range])
            .collect()
    }

    fn scrubbed(value: &str) -> Option<String> {
        scrub(value.as_bytes(), DetectorSet::ALL).map(|out| String::from_utf8(out).expect("masks keep UTF-8 valid"))
    }

    /// `value` is one whole match of `detector` and nothing else, alone and
    /// inside a sentence.
    fn assert_whole(detector: Detector, value: &str) {
        assert_eq!(found(value), [(detector, value)], "{value:?} alone");
        let sentence = format!("see {value}, then");
        assert_eq!(found(&sentence), [(detector, value)], "{value:?} in a sentence");
    }

    /// `detector` finds nothing in `value`.
    fn assert_not(detector: Detector, value: &str) {
        assert_eq!(
            found_by(value, detector),
            Vec::<&str>::new(),
            "{value:?} is not {detector}"
        );
    }

    /// Completes `prefix` with its Luhn check digit.
    fn with_check_digit(prefix: &str) -> String {
        (0..10)
            .map(|d| format!("{prefix}{d}"))
            .find(|number| luhn(number.as_bytes()))
            .expect("one check digit fits")
    }

    #[test]
    fn names_are_stable_and_parse_back() {
        let names: Vec<&str> = Detector::ALL.iter().map(|d| d.name()).collect();
        assert_eq!(names.join(", "), KNOWN_NAMES);
        for detector in Detector::ALL {
            assert_eq!(detector.name().parse::<Detector>(), Ok(detector));
            assert_eq!(detector.to_string(), detector.name());
        }
        let error = "credit_card".parse::<Detector>().unwrap_err();
        assert_eq!(
            error.to_string(),
            format!("unknown content detector `credit_card`: write one of {KNOWN_NAMES}")
        );
    }

    #[test]
    fn detector_sets_hold_what_was_put_in() {
        let set: DetectorSet = [Detector::Card, Detector::Email].into_iter().collect();
        assert!(set.contains(Detector::Email) && set.contains(Detector::Card));
        assert!(!set.contains(Detector::Phone));
        assert_eq!(set.iter().collect::<Vec<_>>(), [Detector::Email, Detector::Card]);
        assert_eq!(format!("{set:?}"), r#"{"email", "card"}"#);
        assert!(set.without(Detector::Email).without(Detector::Card).is_empty());
        assert_eq!(DetectorSet::ALL.iter().count(), Detector::ALL.len());
        assert!(DetectorSet::default().is_empty());
    }

    #[test]
    fn disabled_detectors_find_nothing() {
        let value = "jane@example.com 4111 1111 1111 1111";
        assert_eq!(findings(value.as_bytes(), DetectorSet::EMPTY).count(), 0);
        assert_eq!(found_by(value, Detector::Card), ["4111 1111 1111 1111"]);
        assert_eq!(found_by(value, Detector::Email), ["jane@example.com"]);
    }

    #[test]
    fn emails_are_found_alone_and_inside_text() {
        for email in [
            "jane@example.com",
            "jane.doe+billing@example.co.uk",
            "o'brien@example.ie",
            "user_01@mail-server.example.org",
            "x@xn--bcher-kva.example",
            "a@b.io",
        ] {
            assert_whole(Detector::Email, email);
        }
        assert_eq!(
            found("Contact: jane.doe@example.com."),
            [(Detector::Email, "jane.doe@example.com")]
        );
        assert_eq!(found("<jane@example.com>"), [(Detector::Email, "jane@example.com")]);
        assert_eq!(found("'jane@example.com'"), [(Detector::Email, "jane@example.com")]);
        assert_eq!(found("...jane@example.com"), [(Detector::Email, "jane@example.com")]);
        assert_eq!(
            found("https://app.example.com/invite?email=jane@example.com&next=/home"),
            [(Detector::Email, "jane@example.com")]
        );
        assert_eq!(
            found("mailto:jane@example.com"),
            [(Detector::Email, "jane@example.com")]
        );
        assert_eq!(found("jane@example.com--Jane"), [(Detector::Email, "jane@example.com")]);
        assert_eq!(found("jane@example.com-"), [(Detector::Email, "jane@example.com")]);
        assert_eq!(
            found("jane@mail-1.example.com"),
            [(Detector::Email, "jane@mail-1.example.com")]
        );
    }

    #[test]
    fn emails_with_non_ascii_letters_are_found_whole() {
        assert_eq!(
            found("Müller <müller@bücher.de>"),
            [(Detector::Email, "müller@bücher.de")]
        );
        assert_eq!(found("josé@example.com"), [(Detector::Email, "josé@example.com")]);
        // A dash that is not a letter ends the address.
        assert_eq!(
            found("write—jane@example.com—today"),
            [(Detector::Email, "jane@example.com")]
        );
    }

    #[test]
    fn not_emails() {
        for value in [
            "@example.com",
            "jane@",
            "jane@localhost",
            "postgres@10.0.0.1",
            "jane@example.c",
            "jane@example.123",
            "jane@-example.com",
            "jane@.com",
            "a @ b.com",
            "SELECT 'a' @> 'b'",
            "@@@",
        ] {
            assert_not(Detector::Email, value);
        }
    }

    #[test]
    fn long_local_parts_are_masked_up_to_the_rfc_limit() {
        let local = "x".repeat(100);
        let value = format!("{local}@example.com");
        let found = found(&value);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].1.len(), LOCAL_MAX + "@example.com".len());
    }

    #[test]
    fn phones_in_international_and_national_formats() {
        for phone in [
            "+1 415-555-0100",
            "+1 (415) 555-0100",
            "+44 20 7946 0958",
            "+44 (0)20 7946 0958",
            "+14155550100",
            "+33 1 23 45 67 89",
            "+49 30 12345678",
            "+91 98765 43210",
            "+1.415.555.0100",
            "(415) 555-0100",
            "(415)555-0100",
            "(02) 9876 5432",
            "415-555-0100",
            "415.555.0100",
            "415 555 0100",
            "1-800-555-0199",
            "020 7946 0958",
            "01 23 45 67 89",
            "0412 345 678",
            "06-12345678",
        ] {
            assert_whole(Detector::Phone, phone);
        }
        assert_eq!(
            found("Call +1 415-555-0100 or (415) 555-0101."),
            [
                (Detector::Phone, "+1 415-555-0100"),
                (Detector::Phone, "(415) 555-0101")
            ]
        );

        assert_eq!(
            found("+1 415-555-0100 4111 1111 1111 1111"),
            [
                (Detector::Phone, "+1 415-555-0100"),
                (Detector::Card, "4111 1111 1111 1111")
            ]
        );
        assert_eq!(found("(415) 555-0100 42"), [(Detector::Phone, "(415) 555-0100")]);
        assert_eq!(found("+44 20 7946 0958-12"), [(Detector::Phone, "+44 20 7946 0958")]);
        assert_not(Detector::Phone, "+1 415 555 01001");
        assert_not(Detector::Phone, "+1 4155 5501");
    }

    #[test]
    fn ordinary_numbers_are_not_phones_or_cards() {
        for value in [
            "4155550100",
            "order 4155550100 shipped",
            "0123456789",
            "1700000000",
            "1712345678901",
            "2024-01-15",
            "20240115",
            "2024-01-15T10:30:00Z",
            "2024-01-15 10:30:00.123456+02:00",
            "15.01.2024 10:30",
            "01-15-2024",
            "10:30:00",
            "192.168.100.200",
            "10.0.19041.1",
            "2001:db8::8a2e:370:7334",
            "v1.2.3",
            "version 12.345.6789",
            "1,234,567.89",
            "$12,345,678",
            "1 000 000 000",
            "12345.67",
            "3.14159265358979",
            "-1234567890",
            "+5",
            "+12345",
            "+1.5",
            "+1234.5678",
            "+12.345678",
            "+00 1234 5678",
            "02134-1234",
            "123-456-7890",
            "555-123-4567",
            "ISBN 978-3-16-148410-0",
            "(2024) 12 15",
            "(1) 2345 6789",
            "550e8400-e29b-41d4-a716-446655440000",
            "123e4567-e89b-12d3-a456-426614174000",
            "00:1B:44:11:3A:B7",
        ] {
            assert_eq!(found(value), [], "{value:?}");
        }
    }

    #[test]
    fn cards_that_pass_luhn_with_a_known_prefix() {
        for card in [
            "4111 1111 1111 1111",
            "4111111111111111",
            "4111-1111-1111-1111",
            "5555 5555 5555 4444",
            "2223 0031 2200 3222",
            "3782 822463 10005",
            "378282246310005",
            "6011 1111 1111 1117",
            "3530111333300000",
            "4222222222222",
        ] {
            assert_whole(Detector::Card, card);
        }
        assert_eq!(
            found("card 4111 1111 1111 1111 12/25 cvv 123"),
            [(Detector::Card, "4111 1111 1111 1111")]
        );
        assert_eq!(found("-4111111111111111"), [(Detector::Card, "4111111111111111")]);
    }

    #[test]
    fn luhn_invalid_or_unknown_numbers_are_not_cards() {
        let unknown_prefixes = ["1", "7", "8", "9", "0"].map(|p| with_check_digit(&format!("{p}11111111111111")));
        let visa_of_14 = with_check_digit("4111111111111");
        for number in unknown_prefixes.iter().chain([&visa_of_14]) {
            assert!(luhn(number.as_bytes()), "{number} passes Luhn");
            assert_not(Detector::Card, number);
        }
        for value in [
            "4111 1111 1111 1112",
            "4111111111111112",
            "5555 5555 5555 4445",
            "1234 5678 9012 3456",
            "41111111111111111111",
            "4111111111111111.50",
            "12-4111111111111111",
            "a4111111111111111",
            "411 1111 1111 1111",
            "4111-1111-1111-1111-1111",
            "4111-1111 1111-1111",
        ] {
            assert_not(Detector::Card, value);
        }
    }

    #[test]
    fn commas_between_fields_are_boundaries() {
        // Records, arrays and CSV put sensitive numbers next to each other.
        assert_eq!(
            found("(1,4111111111111111,123-45-6789)"),
            [(Detector::Card, "4111111111111111"), (Detector::Ssn, "123-45-6789")]
        );
        assert_eq!(found("{5555555555554444,078-05-1120}").len(), 2);
        // A thousands separator still joins: 1,234 is one number.
        assert!(found("total 4,111,111,111,111,111 units").is_empty());
        assert!(found("1,234,567.89 and 12,345").is_empty());
    }

    #[test]
    fn a_field_after_a_number_is_not_a_thousands_group() {
        // Whoever writes the query picks the field after a sensitive value:
        // `(card_number, 100)` prints `(5555555555554444,100)`.
        for (value, detector, number) in [
            ("(5555555555554444,100)", Detector::Card, "5555555555554444"),
            ("(937-11-7919,100)", Detector::Ssn, "937-11-7919"),
            ("{5555555555554444,100,200}", Detector::Card, "5555555555554444"),
            ("(4111 1111 1111 1111,256.40)", Detector::Card, "4111 1111 1111 1111"),
            ("(+1-415-555-0101,100)", Detector::Phone, "+1-415-555-0101"),
            ("(+33 1 23 45 67 89,100)", Detector::Phone, "+33 1 23 45 67 89"),
            ("(100,937-11-7919)", Detector::Ssn, "937-11-7919"),
            ("(100,415 555 0101)", Detector::Phone, "415 555 0101"),
            ("(1,234,415-555-0101)", Detector::Phone, "415-555-0101"),
        ] {
            assert_eq!(found(value), [(detector, number)], "{value}");
        }
    }

    #[test]
    fn social_security_numbers() {
        assert_whole(Detector::Ssn, "123-45-6789");
        assert_whole(Detector::Ssn, "078-05-1120");
        // ITINs (area 9xx) are tax ids, as sensitive as SSNs.
        assert_whole(Detector::Ssn, "900-70-1234");
        assert_whole(Detector::Ssn, "999-99-9999");
        assert_eq!(found("(SSN 123-45-6789)"), [(Detector::Ssn, "123-45-6789")]);
        for value in [
            "000-12-3456",
            "666-12-3456",
            "123-00-4567",
            "123-45-0000",
            "123456789",
            "123 45 6789",
            "123-45-67890",
            "1123-45-6789",
            "12-123-45-6789",
            "123-45-6789.5",
        ] {
            assert_not(Detector::Ssn, value);
        }
    }

    #[test]
    fn ibans_with_a_valid_check() {
        for iban in [
            "GB82 WEST 1234 5698 7654 32",
            "GB82WEST12345698765432",
            "DE89 3704 0044 0532 0130 00",
            "FR14 2004 1010 0505 0001 3M02 606",
            "NO93 8601 1117 947",
            "BE68539007547034",
        ] {
            assert_whole(Detector::Iban, iban);
        }
        for value in [
            "GB83 WEST 1234 5698 7654 32",
            "GB82WEST12345698765433",
            "gb82west12345698765432",
            "ZZ82WEST12345698765432",
            "GB82WEST1234569876543",
            "GB82WEST123456987654321",
            "XGB82WEST12345698765432",
            "GB82 WES T123 4569 8765 432",
            "IBAN",
        ] {
            assert_not(Detector::Iban, value);
        }
    }

    #[test]
    fn json_web_tokens() {
        assert_whole(Detector::Jwt, JWT);
        assert_eq!(found(&format!("Authorization: Bearer {JWT}")), [(Detector::Jwt, JWT)]);
        // An unsecured token has an empty signature after its second dot.
        let unsecured = "eyJhbGciOiJub25lIn0.eyJzdWIiOiIxMjM0In0.";
        assert_eq!(found(unsecured), [(Detector::Jwt, unsecured)]);
        let encrypted = "eyJhbGciOiJSU0EtT0FFUCJ9.OKOawDo13gRp2ojaHV7LFpZcgV7T6DVZKTyKOMTYUmKoTCVJRgckCL9kiMT03JGe.48V1_ALb6US04U3b.5eym8TW_c8SuK0ltJ3rpYIzOeDQz7TALvtu6UG9oMo4vpzs9tX_EFShS8iB7j6ji.XFBoMYUZodetZdvTiFvSkQ";
        assert_eq!(found(encrypted), [(Detector::Jwt, encrypted)]);
        for value in [
            "eyJhbGciOiJIUzI1NiJ9",
            "eyJhbGciOiJIUzI1NiJ9.",
            "eyJhbGc.eyJzdWIi.sig",
            "keyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIx.sig",
        ] {
            assert_not(Detector::Jwt, value);
        }
    }

    #[test]
    fn cloud_and_api_tokens() {
        assert_whole(Detector::AwsAccessKey, AWS_KEY);
        assert_whole(Detector::AwsAccessKey, concat!("ASIA", "Y34FZKBOKMUTVV7A"));
        assert_whole(Detector::GithubToken, GITHUB_TOKEN);
        assert_whole(Detector::GithubToken, GITHUB_PAT);
        assert_whole(Detector::SlackToken, SLACK_TOKEN);
        assert_whole(Detector::StripeKey, STRIPE_KEY);
        assert_whole(Detector::StripeKey, concat!("pk_", "test_", "TYooMQauvdEDq54NiTphI7jx"));
        assert_eq!(
            found(&format!("AWS_ACCESS_KEY_ID={AWS_KEY}\nGITHUB_TOKEN={GITHUB_TOKEN}")),
            [(Detector::AwsAccessKey, AWS_KEY), (Detector::GithubToken, GITHUB_TOKEN)]
        );
        for value in [
            concat!("AKIA", "IOSFODNN7EXAMPL"),
            concat!("AKIA", "IOSFODNN7EXAMPLEX"),
            concat!("XAKIA", "IOSFODNN7EXAMPLE"),
            concat!("akia", "iosfodnn7example"),
            "rotate the ghp_ tokens weekly",
            "ghp_short",
            concat!("xghp_", "aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789"),
            "xoxb-",
            "xoxb-123",
            "sk_live_",
            concat!("desk_", "live_", "4eC39HqLyjWDarjtT1zdp7dc"),
            "sk_prod_4eC39HqLyjWDarjtT1zdp7dc",
        ] {
            assert_eq!(found(value), [], "{value:?}");
        }
    }

    #[test]
    fn private_keys_through_their_end_line() {
        assert_whole(Detector::PrivateKey, PEM);
        let unterminated = &PEM[..PEM.len() - 40];
        assert_eq!(found(unterminated), [(Detector::PrivateKey, unterminated)]);
        let openssh = concat!(
            "-----BEGIN ",
            "OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----"
        );
        assert_eq!(
            found(&format!("key:\n{openssh}\nend")),
            [(Detector::PrivateKey, openssh)]
        );
        for value in [
            "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8A\n-----END PUBLIC KEY-----",
            "-----BEGIN CERTIFICATE-----\nMIIDdzCCAl+gAwIBAgIE\n-----END CERTIFICATE-----",
            "-----BEGIN PRIVATE KEY",
            "------",
        ] {
            assert_not(Detector::PrivateKey, value);
        }
    }

    #[test]
    fn several_findings_in_one_value_in_order() {
        let value = "Jane <jane@example.com>, tel +1 415-555-0100, card 4111 1111 1111 1111, \
                     SSN 123-45-6789, IBAN GB82 WEST 1234 5698 7654 32";
        assert_eq!(
            found(value),
            [
                (Detector::Email, "jane@example.com"),
                (Detector::Phone, "+1 415-555-0100"),
                (Detector::Card, "4111 1111 1111 1111"),
                (Detector::Ssn, "123-45-6789"),
                (Detector::Iban, "GB82 WEST 1234 5698 7654 32"),
            ]
        );
        assert_eq!(
            scrubbed(value).as_deref(),
            Some(
                "Jane <****@example.com>, tel [masked:phone], card **** **** **** 1111, \
                 SSN [masked:ssn], IBAN [masked:iban]"
            )
        );
    }

    #[test]
    fn matches_at_both_ends_of_the_value() {
        let value = format!("{AWS_KEY} 4111111111111111");
        assert_eq!(
            found(&value),
            [(Detector::AwsAccessKey, AWS_KEY), (Detector::Card, "4111111111111111")]
        );
        assert_eq!(
            scrubbed(&value).as_deref(),
            Some("[masked:aws_access_key] ************1111")
        );
    }

    #[test]
    fn an_email_wins_over_a_match_inside_its_local_part() {
        assert_eq!(
            found("+14155550100@sms.example.com"),
            [(Detector::Email, "+14155550100@sms.example.com")]
        );
        assert_eq!(
            found("415-555-0100@txt.example.net"),
            [(Detector::Email, "415-555-0100@txt.example.net")]
        );
        assert_eq!(
            found("id 123-45-6789.jd@example.com"),
            [(Detector::Email, "123-45-6789.jd@example.com")]
        );
        assert_eq!(
            scrubbed("+14155550100@sms.example.com").as_deref(),
            Some("****@sms.example.com")
        );
    }

    #[test]
    fn masks_per_detector() {
        let cases = [
            ("jane.doe@example.com", "****@example.com"),
            ("+44 20 7946 0958", "[masked:phone]"),
            ("3782 822463 10005", "**** ****** *0005"),
            ("4111-1111-1111-1111", "****-****-****-1111"),
            ("123-45-6789", "[masked:ssn]"),
            ("GB82WEST12345698765432", "[masked:iban]"),
            (JWT, "[masked:jwt]"),
            (AWS_KEY, "[masked:aws_access_key]"),
            (GITHUB_TOKEN, "[masked:github_token]"),
            (SLACK_TOKEN, "[masked:slack_token]"),
            (STRIPE_KEY, "[masked:stripe_key]"),
            (PEM, "[masked:private_key]"),
        ];
        for (value, masked) in cases {
            assert_eq!(scrubbed(value).as_deref(), Some(masked), "{value:?}");
        }
    }

    #[test]
    fn clean_values_scrub_to_none() {
        for value in [
            "",
            "Jane Doe",
            "SELECT 1",
            "order 12345678 on 2024-01-15",
            "4111 1111 1111 1112",
        ] {
            assert_eq!(scrubbed(value), None, "{value:?}");
        }
    }

    #[test]
    fn scrub_into_appends_only_when_something_matched() {
        let mut out = b"prefix:".to_vec();
        assert!(!scrub_into(b"nothing to see", DetectorSet::ALL, &mut out));
        assert_eq!(out, b"prefix:");
        assert!(scrub_into(b"mail jane@example.com now", DetectorSet::ALL, &mut out));
        assert_eq!(out, b"prefix:mail ****@example.com now");
    }

    #[test]
    fn invalid_utf8_does_not_panic_and_is_kept() {
        let value = b"\xff\xfe jane@example.com \xc3 4111 1111 1111 1111 \xe2\x82";
        let found: Vec<_> = findings(value, DetectorSet::ALL).map(|f| f.detector).collect();
        assert_eq!(found, [Detector::Email, Detector::Card]);
        assert_eq!(
            scrub(value, DetectorSet::ALL).as_deref(),
            Some(&b"\xff\xfe ****@example.com \xc3 **** **** **** 1111 \xe2\x82"[..])
        );
        // Broken sequences next to an address end it rather than join it.
        assert_eq!(
            scrub(b"\xc3jane@example.com\xf0\x9f", DetectorSet::ALL).as_deref(),
            Some(&b"\xc3****@example.com\xf0\x9f"[..]),
        );
        assert_eq!(scrub(b"jane@exa\xe2mple.com", DetectorSet::ALL), None);
        assert_eq!(
            scrub(b"\x80\x80\x80\x80jane@example.com", DetectorSet::ALL).as_deref(),
            Some(&b"\x80\x80\x80\x80****@example.com"[..]),
        );
    }

    /// The prefilter's two tables together say what `plausible_for` says,
    /// for every set of byte classes and any digit count.
    #[test]
    fn prefilter_tables_factor_the_prefilter() {
        for classes in 0..=u8::MAX {
            for digits in 0..40 {
                assert_eq!(
                    PLAUSIBLE_BY_CLASSES[usize::from(classes)]
                        & PLAUSIBLE_BY_DIGITS[digits.min(PLAUSIBLE_BY_DIGITS.len() - 1)],
                    plausible_for(classes, digits),
                    "classes {classes:#010b}, {digits} digits"
                );
            }
        }
    }

    /// A small deterministic generator, so the test needs no dependency and
    /// fails the same way every time.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Findings are in order, non-empty, within the value and apart, and
    /// `scrub` agrees with them, for random bytes and for random mixtures of
    /// real matches, near misses and broken UTF-8.
    #[test]
    fn findings_never_overlap_on_random_input() {
        let alphabet = b"0123456789 -.+()@_:/eyJAKIGBghpxobsk_live\xff\xc3\xa9\xe2\x80";
        let pieces: &[&[u8]] = &[
            b"jane@example.com",
            b"+1 415-555-0100",
            b"4111 1111 1111 1111",
            b"4111111111111112",
            b"123-45-6789",
            b"GB82 WEST 1234 5698 7654 32",
            JWT.as_bytes(),
            AWS_KEY.as_bytes(),
            PEM.as_bytes(),
            b"-----BEGIN ",
            b"2024-01-15",
            b"eyJ",
            b"@",
            b"\xf0\x9f\x98",
            b"\xc3\xa9",
            b" ",
            b".",
        ];
        let mut rng = XorShift(0x5EED_CAFE_F00D_1234);
        let mut value = Vec::new();
        for round in 0..20_000 {
            value.clear();
            for _ in 0..rng.below(40) {
                if round % 2 == 0 {
                    value.push(alphabet[rng.below(alphabet.len())]);
                } else {
                    value.extend_from_slice(pieces[rng.below(pieces.len())]);
                }
            }
            let mut last_end = 0;
            let mut count = 0;
            for finding in findings(&value, DetectorSet::ALL) {
                let Range { start, end } = finding.range;
                assert!(
                    last_end <= start && start < end && end <= value.len(),
                    "{finding:?} in {value:?}"
                );
                last_end = end;
                count += 1;
            }
            assert_eq!(scrub(&value, DetectorSet::ALL).is_some(), count > 0, "{value:?}");
        }
    }

    mod allocations {
        use std::alloc::{GlobalAlloc, Layout, System};
        use std::cell::Cell;

        /// Counts this thread's allocations, so a test can show that a path
        /// allocates nothing. Test threads run in parallel; the count is per
        /// thread so they do not see each other's.
        struct Counting;

        thread_local! {
            static COUNT: Cell<usize> = const { Cell::new(0) };
        }

        fn count() {
            let _ = COUNT.try_with(|count| count.set(count.get() + 1));
        }

        // SAFETY: every method forwards to `System` unchanged; counting
        // touches only a const-initialised thread-local, which never
        // allocates.
        unsafe impl GlobalAlloc for Counting {
            unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
                count();
                unsafe { System.alloc(layout) }
            }

            unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
                count();
                unsafe { System.alloc_zeroed(layout) }
            }

            unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
                count();
                unsafe { System.realloc(ptr, layout, new_size) }
            }

            unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
                unsafe { System.dealloc(ptr, layout) }
            }
        }

        #[global_allocator]
        static COUNTING: Counting = Counting;

        /// How many allocations `f` made on this thread.
        pub(super) fn during(f: impl FnOnce()) -> usize {
            let before = COUNT.with(Cell::get);
            f();
            COUNT.with(Cell::get) - before
        }
    }

    #[test]
    fn nothing_is_allocated_when_nothing_matches() {
        for value in [
            "",
            "Jane Doe",
            "order 12345678901234 shipped 2024-01-15T10:30:00Z to 10.0.0.1",
            "4111 1111 1111 1112",
            "see https://example.com/a-b_c?x=1 or jane@localhost",
            "550e8400-e29b-41d4-a716-446655440000",
            "eyJhbGciOiJIUzI1NiJ9 -----BEGIN CERTIFICATE-----",
        ] {
            let mut out = Vec::new();
            let allocations = allocations::during(|| {
                assert!(scrub(value.as_bytes(), DetectorSet::ALL).is_none());
                assert!(!scrub_into(value.as_bytes(), DetectorSet::ALL, &mut out));
                assert_eq!(findings(value.as_bytes(), DetectorSet::ALL).count(), 0);
            });
            assert_eq!(allocations, 0, "{value:?}");
        }
        // The counter does count: a match allocates its output.
        assert!(allocations::during(|| assert!(scrub(b"jane@example.com", DetectorSet::ALL).is_some())) > 0);
    }

    #[test]
    fn finding_allocates_nothing_even_when_something_matches() {
        let value = format!("jane@example.com +1 415-555-0100 4111 1111 1111 1111 {JWT} {PEM}");
        let mut count = 0;
        let allocations = allocations::during(|| count = findings(value.as_bytes(), DetectorSet::ALL).count());
        assert_eq!((count, allocations), (5, 0));
        // Reusing a buffer with capacity to spare allocates nothing either.
        let mut out = Vec::with_capacity(4 * value.len());
        assert_eq!(
            allocations::during(|| assert!(scrub_into(value.as_bytes(), DetectorSet::ALL, &mut out))),
            0
        );
    }
}
