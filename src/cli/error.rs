//! [`CliError`]: what a command can fail with. Each variant's message is this layer's context
//! only; the cause is its `source()`, printed after it once (see [`CliError::report`]).

use crate::apply::ApplyError;
use crate::auth::TokenError;
use crate::service::OpError;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// An argument or an environment the command cannot work with.
    #[error("{0}")]
    Usage(String),
    #[error("{what}: not JSON")]
    NotJson {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the API")]
    Http(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The API refused the request: its explanation.
    #[error("{0}")]
    Refused(String),
    /// `db`: the SQLite path or the PostgreSQL URL without its password.
    #[error("cannot open the inventory {db}")]
    Open {
        db: String,
        #[source]
        source: OpError,
    },
    #[error(transparent)]
    Op(#[from] OpError),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error(transparent)]
    Fleet(#[from] crate::fleet::FleetError),
    #[error("cannot print the answer as JSON")]
    Print(#[from] serde_json::Error),
    /// The command ran and found problems (doctor, reconcile), already printed.
    #[error("{0}")]
    Problems(String),
}

impl CliError {
    /// The message and its causes, each once: `context: cause: root cause`.
    pub fn report(&self) -> String {
        crate::error::Chain(self).to_string()
    }

    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> CliError {
        let what = what.into();
        move |source| CliError::Io { what, source }
    }

    pub(crate) fn http(e: impl std::error::Error + Send + Sync + 'static) -> CliError {
        CliError::Http(Box::new(e))
    }
}

pub(crate) type Result<T> = std::result::Result<T, CliError>;
