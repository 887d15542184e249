//! One JSON line per plain request (from Pingora's `logging` hook) and per tunnel at its
//! close (from the tunnel guard's `Drop`, so tunnels cut at shutdown, when Pingora no
//! longer calls `logging`, are logged too). To stdout, a file, or nowhere.

use crate::config::AccessLogTarget;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Where the lines go, opened once.
#[derive(Debug)]
pub enum AccessLog {
    /// Standard output.
    Stdout,
    /// Nowhere.
    Off,
    /// An append-only file.
    File(Mutex<std::fs::File>),
}

impl AccessLog {
    /// Opens the target (creating a file in append mode).
    pub fn open(target: &AccessLogTarget) -> std::io::Result<AccessLog> {
        Ok(match target {
            AccessLogTarget::Stdout => AccessLog::Stdout,
            AccessLogTarget::Off => AccessLog::Off,
            AccessLogTarget::File(p) => AccessLog::File(Mutex::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            )),
        })
    }

    /// Whether lines are written at all (so callers can skip building them).
    pub fn enabled(&self) -> bool {
        !matches!(self, AccessLog::Off)
    }

    /// Writes one line; a failing log is not worth failing a request over.
    pub fn write(&self, line: &str) {
        match self {
            AccessLog::Stdout => write_line(&mut std::io::stdout().lock(), line),
            AccessLog::Off => {}
            AccessLog::File(f) => {
                write_line(&mut *f.lock().unwrap_or_else(|e| e.into_inner()), line)
            }
        }
    }
}

/// The caller holds the stdout lock or the file's mutex, so lines from many threads never
/// interleave: no need to copy the line to append its newline.
fn write_line(out: &mut impl std::io::Write, line: &str) {
    let _ = out.write_all(line.as_bytes());
    let _ = out.write_all(b"\n");
    let _ = out.flush();
}

/// Builds a JSON object one field at a time.
pub struct JsonLine(String);

impl JsonLine {
    /// Starts an object with `time`.
    pub fn new(time: SystemTime) -> JsonLine {
        let mut s = String::with_capacity(320);
        s.push_str("{\"time\":");
        json_str(&mut s, &rfc3339(time));
        JsonLine(s)
    }

    /// Adds a string field.
    pub fn str(mut self, key: &str, value: &str) -> JsonLine {
        let _ = write!(self.0, ",\"{key}\":");
        json_str(&mut self.0, value);
        self
    }

    /// Adds a number field.
    pub fn num(mut self, key: &str, value: impl std::fmt::Display) -> JsonLine {
        let _ = write!(self.0, ",\"{key}\":{value}");
        self
    }

    /// Adds a number field, or `null`.
    pub fn opt(self, key: &str, value: Option<impl std::fmt::Display>) -> JsonLine {
        match value {
            Some(v) => self.num(key, v),
            None => self.num(key, "null"),
        }
    }

    /// The finished line.
    pub fn finish(mut self) -> String {
        self.0.push('}');
        self.0
    }
}

/// Appends `s` as a JSON string (with quotes) to `out`.
pub fn json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `SystemTime` as RFC 3339 UTC with milliseconds, like `2026-11-23T01:02:03.456Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Parses RFC 3339 (`2026-11-23T01:02:03Z`, fractions and `±hh:mm` offsets allowed) into
/// unix seconds.
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, min, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || min > 59 || sec > 60 {
        return None;
    }
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        rest = &frac[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let o = rest.get(1..)?;
            if o.len() != 5 || o.as_bytes()[2] != b':' {
                return None;
            }
            sign * (o[..2].parse::<i64>().ok()? * 3600 + o[3..].parse::<i64>().ok()? * 60)
        }
    };
    // Days from civil (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let t = days * 86_400 + hour * 3600 + min * 60 + sec - offset;
    u64::try_from(t).ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_round_trips_and_rejects_junk() {
        for secs in [0u64, 951_782_400, 1_795_395_723, 4_102_444_800] {
            let t = UNIX_EPOCH + Duration::from_secs(secs);
            assert_eq!(parse_rfc3339(&rfc3339(t)), Some(secs));
        }
        assert_eq!(
            parse_rfc3339("2026-11-23T02:02:03+01:00"),
            Some(1_795_395_723)
        );
        for bad in [
            "",
            "2026-11-23",
            "2026-13-01T00:00:00Z",
            "2026-11-23T00:00:00",
            "2026-11-23T00:00:00.Z",
            "yesterday",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    use super::*;
    use std::time::Duration;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_795_395_723_456);
        assert_eq!(rfc3339(t), "2026-11-23T01:02:03.456Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn json_escaping() {
        let mut s = String::new();
        json_str(&mut s, "a\"b\\c\nd\u{1}");
        assert_eq!(s, r#""a\"b\\c\nd\u0001""#);
    }
}
