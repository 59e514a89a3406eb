//! A moment as the node API writes it: RFC 3339 in UTC, as Docker's `inspect` output does
//! (`2019-09-09T17:02:33.513Z`; a whole second has no fraction, as Go's `RFC3339Nano`).
//!
//! The desired state keeps Unix seconds (and milliseconds for keys); only the API's JSON
//! bodies carry this form, and `overlayctl`, which reads them into these types and prints
//! them again, shows it too. Never used in control-plane messages: postcard would carry the
//! text.

use serde::de::{self, Deserializer, Visitor};
use serde::{Serialize, Serializer};
use std::fmt;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// A moment, to the millisecond, since the Unix epoch (UTC).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp {
    unix_ms: u64,
}

impl Timestamp {
    pub fn from_unix_secs(secs: u64) -> Timestamp {
        Timestamp {
            unix_ms: secs.saturating_mul(1000),
        }
    }

    pub fn from_unix_ms(ms: u64) -> Timestamp {
        Timestamp { unix_ms: ms }
    }

    pub fn unix_secs(self) -> u64 {
        self.unix_ms / 1000
    }

    pub fn unix_ms(self) -> u64 {
        self.unix_ms
    }

    /// `2019-09-09T17:02:33.513Z`; `None` past the year 9999, which RFC 3339 cannot write.
    pub fn to_rfc3339(self) -> Option<String> {
        let nanos = i128::from(self.unix_ms) * 1_000_000;
        OffsetDateTime::from_unix_timestamp_nanos(nanos)
            .ok()?
            .format(&Rfc3339)
            .ok()
    }

    /// Reads RFC 3339 with any offset and fraction (kept to the millisecond); `None` for
    /// anything else, or a moment before the epoch.
    pub fn parse_rfc3339(s: &str) -> Option<Timestamp> {
        let t = OffsetDateTime::parse(s, &Rfc3339).ok()?;
        let ms = t.unix_timestamp_nanos().div_euclid(1_000_000);
        Some(Timestamp {
            unix_ms: u64::try_from(ms).ok()?,
        })
    }
}

/// RFC 3339, or the Unix seconds for a moment it cannot write.
impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.to_rfc3339() {
            Some(s) => f.write_str(&s),
            None => write!(f, "{}", self.unix_secs()),
        }
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.to_rfc3339() {
            Some(text) => s.serialize_str(&text),
            None => s.serialize_u64(self.unix_secs()),
        }
    }
}

/// RFC 3339, or a number of Unix seconds: what daemons wrote before (so a newer `overlayctl`
/// reads an older `overlayd`'s answers).
impl<'de> serde::Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Timestamp, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Timestamp;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an RFC 3339 time, or Unix seconds")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Timestamp, E> {
                Timestamp::parse_rfc3339(s)
                    .ok_or_else(|| E::custom(format!("{s:?} is not an RFC 3339 time")))
            }
            fn visit_u64<E: de::Error>(self, secs: u64) -> Result<Timestamp, E> {
                Ok(Timestamp::from_unix_secs(secs))
            }
            fn visit_i64<E: de::Error>(self, secs: i64) -> Result<Timestamp, E> {
                u64::try_from(secs)
                    .map(Timestamp::from_unix_secs)
                    .map_err(|_| E::custom("a time before 1970"))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_as_docker_writes_them() {
        let at = |ms| Timestamp::from_unix_ms(ms).to_rfc3339().unwrap();
        assert_eq!(at(1_568_048_553_513), "2019-09-09T17:02:33.513Z");
        assert_eq!(at(1_568_048_553_500), "2019-09-09T17:02:33.5Z");
        assert_eq!(
            Timestamp::from_unix_secs(1_568_048_553)
                .to_rfc3339()
                .unwrap(),
            "2019-09-09T17:02:33Z"
        );
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(Timestamp::from_unix_secs(u64::MAX).to_rfc3339(), None);
        assert_eq!(
            Timestamp::from_unix_secs(u64::MAX).to_string(),
            (u64::MAX / 1000).to_string()
        );
    }

    #[test]
    fn json_roundtrips_and_reads_numbers_and_offsets() {
        let t = Timestamp::from_unix_ms(1_568_048_553_513);
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(json, r#""2019-09-09T17:02:33.513Z""#);
        assert_eq!(serde_json::from_str::<Timestamp>(&json).unwrap(), t);
        // What earlier daemons sent: Unix seconds.
        assert_eq!(
            serde_json::from_str::<Timestamp>("1568048553").unwrap(),
            Timestamp::from_unix_secs(1_568_048_553)
        );
        // Docker's nanoseconds, and another offset.
        assert_eq!(
            Timestamp::parse_rfc3339("2019-09-09T17:02:33.513475836Z"),
            Some(t)
        );
        assert_eq!(
            Timestamp::parse_rfc3339("2019-09-09T19:02:33.513+02:00"),
            Some(t)
        );
        for bad in [r#""yesterday""#, "-1", r#""1969-12-31T23:59:59Z""#, "true"] {
            assert!(serde_json::from_str::<Timestamp>(bad).is_err(), "{bad}");
        }
    }
}
