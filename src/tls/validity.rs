//! The expiry date (`notAfter`) of a certificate, for `status`: a few lines of DER walking
//! instead of an X.509 crate, since nothing else of the certificate is read here (rustls and
//! webpki check it properly when it is loaded).

/// One DER element at the start of `input`: (tag, contents, rest).
fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// `notAfter` of the DER certificate `der` as `YYYY-MM-DD HH:MM:SS UTC`; `None` if the DER is
/// not shaped as X.509 expects.
pub fn not_after(der: &[u8]) -> Option<String> {
    const SEQUENCE: u8 = 0x30;
    let (SEQUENCE, certificate, _) = element(der)? else { return None };
    let (SEQUENCE, tbs, _) = element(certificate)? else { return None };
    let mut rest = tbs;
    // [0] version is optional (absent in v1 certificates).
    if rest.first() == Some(&0xa0) {
        rest = element(rest)?.2;
    }
    // serialNumber, signature, issuer, then validity.
    for _ in 0..3 {
        rest = element(rest)?.2;
    }
    let (SEQUENCE, validity, _) = element(rest)? else { return None };
    let after = element(validity)?.2;
    let (tag, time, _) = element(after)?;
    let time = std::str::from_utf8(time).ok()?;
    // UTCTime YYMMDDHHMMSSZ (years 1950-2049) or GeneralizedTime YYYYMMDDHHMMSSZ.
    let full = match (tag, time.len()) {
        (0x17, 13) => format!("{}{time}", if &time[..2] < "50" { "20" } else { "19" }),
        (0x18, 15) => time.to_owned(),
        _ => return None,
    };
    if !full[..14].bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let f = |a: usize, b: usize| &full[a..b];
    Some(format!("{}-{}-{} {}:{}:{} UTC", f(0, 4), f(4, 6), f(6, 8), f(8, 10), f(10, 12), f(12, 14)))
}

#[cfg(test)]
mod tests {
    use super::not_after;

    #[test]
    fn reads_utc_and_generalized_times() {
        for (year, expected) in [(2031, "2031-01-02 00:00:00 UTC"), (2051, "2051-01-02 00:00:00 UTC")] {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
            params.not_after = rcgen::date_time_ymd(year, 1, 2);
            let cert = params.self_signed(&key).unwrap();
            assert_eq!(not_after(cert.der()).as_deref(), Some(expected));
        }
    }

    #[test]
    fn garbage_has_no_date() {
        assert_eq!(not_after(b""), None);
        assert_eq!(not_after(&[0x30, 0x82, 0xff]), None);
        assert_eq!(not_after(&[0x30, 0x03, 0x30, 0x01, 0x00]), None);
    }
}
