//! Printing an error once: each error's `Display` says only its own layer's context and
//! `source()` carries the cause, so a message is the chain joined with `: `.

use std::fmt;

/// An error and its causes, `outer: inner: root`.
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            write!(f, ": {c}")?;
            cause = c.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Chain;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot open the inventory")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn each_layer_is_printed_once() {
        let e = Outer(std::io::Error::other("disk on fire"));
        assert_eq!(
            Chain(&e).to_string(),
            "cannot open the inventory: disk on fire"
        );
    }
}
