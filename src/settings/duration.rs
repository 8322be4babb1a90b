//! Durations in settings are humantime strings with a unit: `"200ms"`, `"2s"`, `"1m 30s"`.
//!
//! A bare number is refused with a message that shows how to write it, because `30` could mean
//! seconds or milliseconds and a wrong guess is a silent outage.

use std::time::Duration;

use serde::{de, Deserialize, Deserializer};

/// Parses a humantime duration, refusing bare numbers with a helpful message.
pub(crate) fn parse(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    if !trimmed.is_empty() && trimmed.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(format!(
            "`{trimmed}` has no unit: write a duration with a unit, e.g. \"{trimmed}s\" or \"{trimmed}ms\""
        ));
    }
    humantime::parse_duration(trimmed).map_err(|error| {
        format!(
            "`{trimmed}` is not a duration ({error}): write e.g. \"200ms\", \"2s\" or \"1m 30s\""
        )
    })
}

/// Formats a duration the way the settings file writes it.
pub(crate) fn format(duration: Duration) -> String {
    humantime::format_duration(duration).to_string()
}

/// Deserializes a required duration (`#[serde(deserialize_with = "duration::required")]`).
pub(crate) fn required<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let value = DurationText::deserialize(deserializer)?;
    parse(&value.0).map_err(de::Error::custom)
}

/// Deserializes an optional duration (`#[serde(default, deserialize_with = "duration::optional")]`).
pub(crate) fn optional<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Duration>, D::Error> {
    required(deserializer).map(Some)
}

/// Accepts a string, and also a number so that the "no unit" message can be given for `wait = 30`.
struct DurationText(String);

impl<'de> Deserialize<'de> for DurationText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = DurationText;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a duration with a unit, e.g. \"2s\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<DurationText, E> {
                Ok(DurationText(v.to_owned()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<DurationText, E> {
                Ok(DurationText(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<DurationText, E> {
                Ok(DurationText(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<DurationText, E> {
                Ok(DurationText(v.to_string()))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_units() {
        assert_eq!(parse("200ms"), Ok(Duration::from_millis(200)));
        assert_eq!(parse("1m 30s"), Ok(Duration::from_secs(90)));
    }

    #[test]
    fn refuses_bare_numbers_with_a_hint() {
        let message = parse("30").unwrap_err();
        assert!(message.contains("no unit"), "{message}");
        assert!(message.contains("\"30s\""), "{message}");
    }

    #[test]
    fn refuses_garbage() {
        assert!(parse("soon").unwrap_err().contains("not a duration"));
    }

    #[test]
    fn formats_round_trip() {
        let d = Duration::from_millis(1500);
        assert_eq!(parse(&format(d)), Ok(d));
    }
}
