//! Printing for the command line: tables, and text made safe for a terminal.

use serde_json::Value;

pub(super) fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub(super) fn print_units(units: &[Value]) {
    print_table(
        &[
            "COMPUTE_ID",
            "STATUS",
            "CPUS",
            "CPU_RANGE",
            "PORTS",
            "USER",
            "IP",
            "REGION-ZONE",
            "STARTED_AT",
            "TAGS",
        ],
        units
            .iter()
            .map(|u| {
                vec![
                    text(&u["compute_id"]),
                    text(&u["status"]),
                    text(&u["cpu_count"]),
                    text(&u["cpu_range"]),
                    text(&u["ports_range"]),
                    text(&u["user"]),
                    text(&u["ip"]),
                    format!("{}-{}", text(&u["region"]), text(&u["zone"])),
                    text(&u["started_at"]),
                    if u["tags"].is_null() {
                        "-".into()
                    } else {
                        u["tags"].to_string()
                    },
                ]
            })
            .collect(),
    );
}

/// `s` safe to print on a terminal: control characters (newlines, escape sequences, C1 codes)
/// and bidirectional overrides, which a tenant can put in a file name that reaches an error or
/// a `user` caller in a tag, are shown escaped (`\n`, `\u{1b}`) instead of acting.
pub(super) fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    let bad = |c: char| {
        c.is_control()
            || matches!(c, '\u{200e}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !s.chars().any(bad) {
        return s.into();
    }
    s.chars()
        .map(|c| {
            if bad(c) {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

pub(super) fn print_table(headers: &[&str], rows: Vec<Vec<String>>) {
    let rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|r| r.iter().map(|c| printable(c).into_owned()).collect())
        .collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn printable_escapes_what_a_terminal_would_act_on() {
        assert_eq!(printable("plain ascii, ελληνικά"), "plain ascii, ελληνικά");
        assert_eq!(
            printable("x\n2026-01-01 forged line\x1b]0;title\x07\u{9b}2J\u{202e}txt.exe"),
            "x\\n2026-01-01 forged line\\u{1b}]0;title\\u{7}\\u{9b}2J\\u{202e}txt.exe"
        );
        assert!(!printable("\r\t\x7f").chars().any(char::is_control));
    }
}
