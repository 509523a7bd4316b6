//! What every layer's settings are made of: lengths of time in one convention, and the
//! problems a check finds, each naming its key, so that one bad file is reported whole.
//! Each layer defines and checks its own section; `config` assembles them.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The longest any time setting may be: beyond it, timers and deadlines would overflow
/// the clock.
pub(crate) const DAY: Duration = Duration::from_secs(86_400);

/// A length of time written as `30d`, `12h`, `15m`, `90s` or `500ms`; `0` means never (the
/// feature it sets is off). Every time setting is one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Period(pub Duration);

impl Period {
    /// `None` when off.
    pub fn get(self) -> Option<Duration> {
        (!self.0.is_zero()).then_some(self.0)
    }

    /// A period of `millis` milliseconds.
    pub const fn millis(millis: u64) -> Self {
        Self(Duration::from_millis(millis))
    }
}

impl std::str::FromStr for Period {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        if text == "0" {
            return Ok(Self::default());
        }
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| format!("{text:?} has no unit (ms, s, m, h or d)"))?;
        let (number, unit) = text.split_at(split);
        let number: u64 = number
            .parse()
            .map_err(|_| format!("{text:?} does not start with a number"))?;
        let millis_per = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(format!("{text:?}: the unit must be ms, s, m, h or d")),
        };
        number
            .checked_mul(millis_per)
            .map(Self::millis)
            .ok_or_else(|| format!("{text:?} is too long"))
    }
}

impl std::fmt::Display for Period {
    /// In the largest unit that divides it (`1d`, `90s`, `250ms`; `0` when off), so that it
    /// reads back as the same period.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let millis = self.0.as_millis();
        if millis == 0 {
            return f.write_str("0");
        }
        let units = [
            ("d", 86_400_000),
            ("h", 3_600_000),
            ("m", 60_000),
            ("s", 1_000),
        ];
        match units.iter().find(|(_, per)| millis % per == 0) {
            Some((unit, per)) => write!(f, "{}{unit}", millis / per),
            None => write!(f, "{millis}ms"),
        }
    }
}

impl Serialize for Period {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Period {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(PeriodVisitor)
    }
}

/// Reads a period from its text, or from a bare `0` (an environment variable `...=0` is
/// read as a number).
struct PeriodVisitor;

impl serde::de::Visitor<'_> for PeriodVisitor {
    type Value = Period;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a length of time such as \"500ms\", \"30s\" or \"7d\", or 0")
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Period, E> {
        text.parse().map_err(E::custom)
    }

    fn visit_u64<E: serde::de::Error>(self, number: u64) -> Result<Period, E> {
        number.to_string().parse().map_err(E::custom)
    }

    fn visit_i64<E: serde::de::Error>(self, number: i64) -> Result<Period, E> {
        number.to_string().parse().map_err(E::custom)
    }
}

/// The problems settings have, one line each: `key: what is wrong`.
#[derive(Debug, Default)]
pub struct Problems(Vec<String>);

impl Problems {
    /// Records `problem` unless `ok`.
    pub fn check(&mut self, ok: bool, problem: &str) {
        if !ok {
            self.0.push(problem.to_owned());
        }
    }

    /// Records that `key` must lie between `min` and `max`, unless `value` does.
    pub fn within(&mut self, key: &str, value: Period, min: Duration, max: Duration) {
        let shown = |bound: Duration| Period(bound).to_string();
        self.check(
            (min..=max).contains(&value.0),
            &format!("{key}: between {} and {}", shown(min), shown(max)),
        );
    }

    /// Records a problem as it is.
    pub fn push(&mut self, problem: String) {
        self.0.push(problem);
    }

    /// Whether nothing is wrong.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Every problem, in the order found.
    pub fn into_lines(self) -> Vec<String> {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_read_with_their_unit() {
        let ms = |text: &str| text.parse::<Period>().map(|p| p.0.as_millis());
        assert_eq!(ms("30d"), Ok(30 * 86_400_000));
        assert_eq!(ms("2s"), Ok(2_000));
        assert_eq!(ms("250ms"), Ok(250));
        assert_eq!(ms("0"), Ok(0));
        assert!(ms("30").unwrap_err().contains("no unit"));
        assert!(ms("3w").unwrap_err().contains("unit must be"));
        assert!(ms("d").is_err());
        assert!(ms("106751991167301d").unwrap_err().contains("too long"));
        assert_eq!(Period::default().get(), None);
        for text in ["0", "250ms", "90s", "15m", "12h", "30d"] {
            assert_eq!(text.parse::<Period>().unwrap().to_string(), text);
        }
    }

    #[test]
    fn a_bare_zero_is_off_and_other_numbers_need_a_unit() {
        #[derive(Deserialize)]
        struct Holder {
            every: Period,
        }
        let read = |value: &str| -> Result<Period, String> {
            let text = format!("every = {value}");
            let holder: Result<Holder, _> = config::Config::builder()
                .add_source(config::File::from_str(&text, config::FileFormat::Toml))
                .build()
                .and_then(config::Config::try_deserialize);
            holder.map(|h| h.every).map_err(|e| e.to_string())
        };
        assert_eq!(read("0"), Ok(Period::default()));
        assert_eq!(read("\"1s\""), Ok(Period::millis(1000)));
        assert!(read("1000").unwrap_err().contains("no unit"));
    }

    #[test]
    fn bounds_name_their_key_and_range() {
        let mut problems = Problems::default();
        let second = Duration::from_secs(1);
        problems.within("a.b", Period::millis(5), Duration::from_millis(10), second);
        problems.within("a.c", Period::millis(50), Duration::from_millis(10), second);
        assert_eq!(problems.into_lines(), vec!["a.b: between 10ms and 1s"]);
    }
}
