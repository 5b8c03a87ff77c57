//! Just enough of X.509 (DER) to tell an operator about a certificate and to bind a client
//! certificate to an edge id: the validity period, the subject's common name and the DNS names of
//! the subject alternative name extension. Never panics on any input; anything unreadable is `None`.
//! Dates go through `outpost_core::time`'s calendar.

use outpost_core::time::{civil_from_days, days_from_civil};

/// What outpost reads from a certificate.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CertSummary {
    /// Seconds since the Unix epoch.
    pub not_before: i64,
    pub not_after: i64,
    pub common_name: Option<String>,
    pub dns_names: Vec<String>,
}

impl CertSummary {
    /// The names the certificate is issued to: its DNS names, then its common name.
    pub fn identities(&self) -> Vec<String> {
        let mut names = self.dns_names.clone();
        if let Some(cn) = &self.common_name {
            if !names.contains(cn) {
                names.push(cn.clone());
            }
        }
        names
    }
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;
const OCTET_STRING: u8 = 0x04;
const BOOLEAN: u8 = 0x01;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;
const CONTEXT_0: u8 = 0xa0;
const CONTEXT_3: u8 = 0xa3;
const DNS_NAME: u8 = 0x82;
/// 2.5.4.3
const OID_COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];
/// 2.5.29.17
const OID_SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1d, 0x11];

/// Reads one DER element: (tag, contents, rest).
fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let len = rest[..count].iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[count..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

fn expect(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (t, contents, rest) = element(input)?;
    (t == tag).then_some((contents, rest))
}

/// Parses a DER certificate.
pub fn summarize(der: &[u8]) -> Option<CertSummary> {
    let (certificate, _) = expect(der, SEQUENCE)?;
    let (tbs, _) = expect(certificate, SEQUENCE)?;
    let mut rest = tbs;
    // version [0] EXPLICIT, optional
    if let Some((CONTEXT_0, _, after)) = element(rest) {
        rest = after;
    }
    let (_serial, _, after) = element(rest)?;
    rest = after;
    let (_, after) = expect(rest, SEQUENCE)?; // signature algorithm
    rest = after;
    let (_, after) = expect(rest, SEQUENCE)?; // issuer
    rest = after;
    let (validity, after) = expect(rest, SEQUENCE)?;
    rest = after;
    let (subject, after) = expect(rest, SEQUENCE)?;
    rest = after;
    let (_, after) = expect(rest, SEQUENCE)?; // subject public key info
    rest = after;

    let (t1, v1, after_v) = element(validity)?;
    let (t2, v2, _) = element(after_v)?;
    let mut summary = CertSummary {
        not_before: time(t1, v1)?,
        not_after: time(t2, v2)?,
        common_name: common_name(subject),
        dns_names: Vec::new(),
    };
    // issuerUniqueID [1], subjectUniqueID [2], extensions [3]
    while let Some((tag, contents, after)) = element(rest) {
        rest = after;
        if tag == CONTEXT_3 {
            summary.dns_names = dns_names(contents).unwrap_or_default();
        }
    }
    Some(summary)
}

fn common_name(mut name: &[u8]) -> Option<String> {
    while let Some((rdn, after)) = expect(name, SET) {
        name = after;
        let mut attributes = rdn;
        while let Some((attribute, after)) = expect(attributes, SEQUENCE) {
            attributes = after;
            let (oid, value) = expect(attribute, OID)?;
            if oid == OID_COMMON_NAME {
                let (_, text, _) = element(value)?;
                return String::from_utf8(text.to_vec()).ok();
            }
        }
    }
    None
}

fn dns_names(extensions: &[u8]) -> Option<Vec<String>> {
    let (mut list, _) = expect(extensions, SEQUENCE)?;
    while let Some((extension, after)) = expect(list, SEQUENCE) {
        list = after;
        let (oid, mut rest) = expect(extension, OID)?;
        if oid != OID_SUBJECT_ALT_NAME {
            continue;
        }
        if let Some((_, after)) = expect(rest, BOOLEAN) {
            rest = after;
        }
        let (value, _) = expect(rest, OCTET_STRING)?;
        let (mut names, _) = expect(value, SEQUENCE)?;
        let mut found = Vec::new();
        while let Some((tag, contents, after)) = element(names) {
            names = after;
            if tag == DNS_NAME {
                if let Ok(name) = std::str::from_utf8(contents) {
                    found.push(name.to_string());
                }
            }
        }
        return Some(found);
    }
    Some(Vec::new())
}

fn time(tag: u8, text: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(text).ok()?;
    let (year, rest) = match tag {
        UTC_TIME => {
            let yy: i64 = text.get(0..2)?.parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, text.get(2..)?)
        }
        GENERALIZED_TIME => (text.get(0..4)?.parse().ok()?, text.get(4..)?),
        _ => return None,
    };
    let field = |i: usize| -> Option<i64> { rest.get(i..i + 2)?.parse().ok() };
    let (month, day, hour, minute, second) = (field(0)?, field(2)?, field(4)?, field(6)?, field(8)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second)
}

/// `2026-11-26T01:15:52Z` for a Unix time in seconds.
pub fn format_time(unix: i64) -> String {
    let (year, month, day) = civil_from_days(unix.div_euclid(86_400));
    let secs = unix.rem_euclid(86_400);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", secs / 3600, secs % 3600 / 60, secs % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        assert_eq!(time(UTC_TIME, b"700101000000Z"), Some(0));
        assert_eq!(time(GENERALIZED_TIME, b"20261126011552Z"), Some(1_795_655_752));
        assert_eq!(format_time(1_795_655_752), "2026-11-26T01:15:52Z");
        assert_eq!(time(UTC_TIME, b"49"), None);
        assert_eq!(time(UTC_TIME, b"701301000000Z"), None);
    }

    #[test]
    fn garbage_is_none() {
        for input in [&b""[..], b"\x30", b"\x30\x84\xff\xff\xff\xff", b"\x30\x03\x30\x01\x00", b"hello"] {
            assert_eq!(summarize(input), None);
        }
    }
}
