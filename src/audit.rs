//! Keeping the audit log bounded: every text it records is clipped, a source that keeps being
//! refused gets its first few refusals recorded and then one summary per window, and old rows
//! are pruned by age and count. Pure logic; the store and the API do the writing.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Longest free text (a refusal's detail, a path) an audit row or a log line keeps.
pub(crate) const MAX_TEXT: usize = 512;
/// Longest name (actor, operation, compute id, host name) an audit row keeps.
pub(crate) const MAX_NAME: usize = 256;

/// `s` cut to at most `max` bytes (on a character boundary) with a marker saying how much was
/// cut; `s` itself when it fits.
pub(crate) fn clip(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if s.len() <= max {
        return s.into();
    }
    let marker = format!("…[{} more bytes]", s.len());
    let mut end = max.saturating_sub(marker.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let cut = s.len() - end;
    format!("{}…[{cut} more bytes]", &s[..end]).into()
}

/// Refusals one source may have recorded per window before they are only counted.
pub(crate) const DENIALS_PER_WINDOW: u32 = 5;
/// Sources tracked at once; beyond that, new sources share one slot.
const MAX_SOURCES: usize = 4096;
const OTHER_SOURCES: &str = "other sources";

/// What to do with one refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Record,
    Suppress,
}

/// Refusals of one source that were counted but not recorded, in a window now over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Suppressed {
    pub(crate) source: String,
    pub(crate) count: u32,
    pub(crate) window: Duration,
}

impl Suppressed {
    pub(crate) fn detail(&self) -> String {
        format!(
            "{} more refused requests from {} suppressed (at most {DENIALS_PER_WINDOW} recorded per {} s)",
            self.count,
            self.source,
            self.window.as_secs()
        )
    }
}

#[derive(Debug)]
struct Slot {
    start: Instant,
    seen: u32,
}

/// Counts refusals per source (a uid on the unix socket or for a local TCP caller, a token, or
/// an address over TCP) in fixed windows.
#[derive(Debug)]
pub(crate) struct DenialLimiter {
    window: Duration,
    burst: u32,
    slots: HashMap<String, Slot>,
}

impl DenialLimiter {
    pub(crate) fn new(window: Duration, burst: u32) -> DenialLimiter {
        DenialLimiter {
            window,
            burst,
            slots: HashMap::new(),
        }
    }

    pub(crate) fn window(&self) -> Duration {
        self.window
    }

    /// Counts one refusal of `source` at `now`: whether to record it, and the summary of that
    /// source's previous window if it ended with refusals suppressed.
    pub(crate) fn check(&mut self, source: &str, now: Instant) -> (Verdict, Option<Suppressed>) {
        let key = if self.slots.contains_key(source) || self.slots.len() < MAX_SOURCES {
            source
        } else {
            OTHER_SOURCES
        };
        let mut ended = None;
        if let Some(slot) = self.slots.get(key)
            && now.duration_since(slot.start) >= self.window
        {
            ended = self.summary(key, slot);
            self.slots.remove(key);
        }
        let slot = self.slots.entry(key.to_string()).or_insert(Slot {
            start: now,
            seen: 0,
        });
        slot.seen = slot.seen.saturating_add(1);
        let verdict = if slot.seen <= self.burst {
            Verdict::Record
        } else {
            Verdict::Suppress
        };
        (verdict, ended)
    }

    /// Forgets every window that is over, returning the summaries of those that suppressed
    /// something.
    pub(crate) fn expire(&mut self, now: Instant) -> Vec<Suppressed> {
        let mut out = Vec::new();
        let window = self.window;
        let burst = self.burst;
        self.slots.retain(|source, slot| {
            if now.duration_since(slot.start) < window {
                return true;
            }
            if slot.seen > burst {
                out.push(Suppressed {
                    source: source.clone(),
                    count: slot.seen - burst,
                    window,
                });
            }
            false
        });
        out.sort_by(|a, b| a.source.cmp(&b.source));
        out
    }

    fn summary(&self, source: &str, slot: &Slot) -> Option<Suppressed> {
        (slot.seen > self.burst).then(|| Suppressed {
            source: source.to_string(),
            count: slot.seen - self.burst,
            window: self.window,
        })
    }
}

/// How long audit rows are kept (`KLOIGOS_AUDIT_RETENTION_DAYS`, `KLOIGOS_AUDIT_MAX_ROWS`;
/// 0 turns either off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Retention {
    pub(crate) days: u32,
    pub(crate) max_rows: u64,
}

impl Retention {
    /// Rows older than this (RFC 3339, UTC) go, if rows expire by age.
    pub(crate) fn cutoff(&self, now: time::OffsetDateTime) -> Option<String> {
        if self.days == 0 {
            return None;
        }
        let t = now - time::Duration::days(self.days.into());
        t.format(&time::format_description::well_known::Rfc3339)
            .ok()
    }

    pub(crate) fn max_rows(&self) -> Option<u64> {
        (self.max_rows > 0).then_some(self.max_rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_keeps_short_text_and_marks_cuts() {
        assert_eq!(clip("short", 10), "short");
        let long = "a".repeat(70_000);
        let c = clip(&long, MAX_TEXT);
        assert!(c.len() <= MAX_TEXT, "{}", c.len());
        assert!(c.ends_with("more bytes]"), "{c}");
        let cut: usize = c
            .rsplit('[')
            .next()
            .and_then(|t| t.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap();
        assert_eq!(
            cut + c.find('…').unwrap(),
            70_000,
            "the marker says what was cut"
        );
        // Never splits a character.
        let greek = "κλοηγός".repeat(200);
        let c = clip(&greek, 100);
        assert!(c.len() <= 100 && c.starts_with("κλοηγός"));
    }

    #[test]
    fn limiter_records_a_burst_then_one_summary_per_window() {
        let t0 = Instant::now();
        let w = Duration::from_secs(60);
        let mut l = DenialLimiter::new(w, 3);
        let verdicts: Vec<_> = (0..10).map(|_| l.check("uid 65534", t0).0).collect();
        assert_eq!(
            verdicts,
            [vec![Verdict::Record; 3], vec![Verdict::Suppress; 7]].concat()
        );
        // Another source has its own budget.
        assert_eq!(l.check("127.0.0.1", t0).0, Verdict::Record);
        assert!(l.expire(t0 + Duration::from_secs(59)).is_empty());
        // The next refusal after the window reports the suppressed ones and starts afresh.
        let (v, summary) = l.check("uid 65534", t0 + w);
        assert_eq!(v, Verdict::Record);
        let summary = summary.unwrap();
        assert_eq!((summary.source.as_str(), summary.count), ("uid 65534", 7));
        assert!(
            summary
                .detail()
                .starts_with("7 more refused requests from uid 65534")
        );
        // Expiry reports only windows that suppressed something, once.
        for _ in 0..4 {
            l.check("uid 65534", t0 + w);
        }
        let ended = l.expire(t0 + w * 2);
        assert_eq!(ended.len(), 1, "{ended:?}");
        assert_eq!(ended[0].count, 2);
        assert!(l.expire(t0 + w * 3).is_empty());
        assert!(l.slots.is_empty(), "expired windows are forgotten");
    }

    #[test]
    fn limiter_memory_is_bounded() {
        let t0 = Instant::now();
        let mut l = DenialLimiter::new(Duration::from_secs(60), 1);
        for i in 0..(MAX_SOURCES + 100) {
            l.check(&format!("10.0.{}.{}", i / 256, i % 256), t0);
        }
        assert_eq!(l.slots.len(), MAX_SOURCES + 1);
        assert_eq!(l.slots[OTHER_SOURCES].seen, 100);
    }

    #[test]
    fn retention_cutoff() {
        let now = time::macros::datetime!(2026-11-23 14:00 UTC);
        let r = Retention {
            days: 30,
            max_rows: 0,
        };
        assert_eq!(r.cutoff(now).unwrap(), "2026-10-24T14:00:00Z");
        assert_eq!(r.max_rows(), None);
        let off = Retention {
            days: 0,
            max_rows: 10,
        };
        assert_eq!((off.cutoff(now), off.max_rows()), (None, Some(10)));
    }
}
