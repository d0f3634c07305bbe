//! Durations as the wire carries them and as the legacy broadcasts print them.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A duration in seconds, as sent in `job finished` / `pipeline finished`.
///
/// It keeps the JSON number it was sent as, because the broadcasts print it the way the
/// Python 2 router printed it: `3` stays `3`, `2.0` stays `2.0`, floats keep 12 significant
/// digits (`0.123456789012345` prints `0.123456789012`) and large ones use an exponent
/// (`1e16` prints `1e+16`).
///
/// ```
/// use pypelinin_common::protocol::WireDuration;
/// let d: WireDuration = serde_json::from_str("1.5").unwrap();
/// assert_eq!(d.to_string(), "1.5");
/// assert_eq!(WireDuration::from_secs(2.0).to_string(), "2.0");
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WireDuration(serde_json::Number);

impl WireDuration {
    /// A duration of `secs` seconds. Non-finite values (which JSON cannot carry) become 0.
    pub fn from_secs(secs: f64) -> Self {
        Self(serde_json::Number::from_f64(secs).unwrap_or_else(|| 0.into()))
    }

    /// The duration in seconds.
    pub fn as_secs(&self) -> f64 {
        self.0.as_f64().unwrap_or(0.0)
    }
}

impl From<std::time::Duration> for WireDuration {
    fn from(d: std::time::Duration) -> Self {
        Self::from_secs(d.as_secs_f64())
    }
}

impl fmt::Display for WireDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_f64() {
            f.write_str(&python2_float_str(self.as_secs()))
        } else {
            // Integers print as they are, like Python's `str(3)`.
            write!(f, "{}", self.0)
        }
    }
}

/// Formats a float as Python 2's `str(float)`: `%.12g`, plus `.0` when that looks integral.
pub fn python2_float_str(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf".into() } else { "-inf".into() };
    }
    if x == 0.0 {
        return if x.is_sign_negative() {
            "-0.0".into()
        } else {
            "0.0".into()
        };
    }
    const PRECISION: i32 = 12;
    // `{:e}` with 11 decimals rounds to 12 significant digits and tells the exponent after
    // rounding, which is what `%g` uses to choose between fixed and exponent notation.
    let sci = format!("{:.*e}", (PRECISION - 1) as usize, x);
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if !(-4..PRECISION).contains(&exp) {
        let mantissa = strip_fraction_zeros(mantissa);
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    } else {
        let decimals = (PRECISION - 1 - exp).max(0) as usize;
        let fixed = format!("{x:.decimals$}");
        let fixed = strip_fraction_zeros(&fixed);
        if fixed.contains('.') {
            fixed.to_owned()
        } else {
            format!("{fixed}.0")
        }
    }
}

fn strip_fraction_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(json: &str) -> String {
        serde_json::from_str::<WireDuration>(json)
            .unwrap()
            .to_string()
    }

    #[test]
    fn prints_like_python2() {
        assert_eq!(shown("3"), "3");
        assert_eq!(shown("0.1"), "0.1");
        assert_eq!(shown("1.5"), "1.5");
        assert_eq!(shown("2.0"), "2.0");
        assert_eq!(shown("0.123456789012345"), "0.123456789012");
        assert_eq!(shown("1e16"), "1e+16");
        assert_eq!(shown("-7"), "-7");
        assert_eq!(shown("0.0"), "0.0");
        assert_eq!(shown("123456789012.5"), "123456789012.0");
        assert_eq!(shown("1234567890123.0"), "1.23456789012e+12");
        assert_eq!(shown("0.0001"), "0.0001");
        assert_eq!(shown("0.00001"), "1e-05");
        assert_eq!(shown("100.0"), "100.0");
    }

    #[test]
    fn printed_value_parses_back_as_the_same_float_within_precision() {
        for x in [0.000123, 1.0 / 3.0, 42.25, 9.99e20, 5e-10] {
            let printed = python2_float_str(x);
            let back: f64 = printed.parse().unwrap();
            assert!((back - x).abs() <= x.abs() * 1e-11, "{x} printed {printed}");
        }
    }
}
