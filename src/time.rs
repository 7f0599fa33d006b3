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
