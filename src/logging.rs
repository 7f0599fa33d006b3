//! Logs: to the journal with structured fields (`COMPUTE_ID=`, `OPERATION=`, …) when running
//! under systemd, to stderr otherwise. `KLOIGOS_LOG` sets the filter (default `info`).

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

pub fn init() {
    let filter = EnvFilter::try_from_env("KLOIGOS_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    // systemd sets JOURNAL_STREAM when stderr is connected to the journal.
    if std::env::var_os("JOURNAL_STREAM").is_some()
        && let Ok(journald) = tracing_journald::layer()
    {
        let _ = registry
            .with(
                journald
                    .with_syslog_identifier("kloigos".into())
                    // Fields as COMPUTE_ID=, OPERATION=, not F_COMPUTE_ID=.
                    .with_field_prefix(None),
            )
            .try_init();
        return;
    }
    let _ = registry
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_target(false),
        )
        .try_init();
}
