//! Wall-clock timestamps as RFC 3339 UTC strings, the form stored and returned by the API.

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Now, as `2026-11-23T09:33:10.123456Z`.
pub(crate) fn now() -> String {
    let now = OffsetDateTime::now_utc();
    // Microsecond precision, like FastAPI's datetimes.
    let now = now
        .replace_nanosecond(now.nanosecond() / 1000 * 1000)
        .unwrap_or(now);
    now.format(&Rfc3339)
        .unwrap_or_else(|_| now.unix_timestamp().to_string())
}

/// The time `d` ago, in the same form as [`now`] (to compare with stored timestamps).
pub(crate) fn ago(d: std::time::Duration) -> String {
    let then = OffsetDateTime::now_utc() - d;
    let then = then
        .replace_nanosecond(then.nanosecond() / 1000 * 1000)
        .unwrap_or(then);
    then.format(&Rfc3339)
        .unwrap_or_else(|_| then.unix_timestamp().to_string())
}
