//! JSON bodies for the error responses hyper writes by itself. On a request it cannot parse
//! (garbage request line: 400, URI over 64 KiB: 414, header section over its buffer: 431) hyper
//! answers before our router sees anything, with an empty body, and offers no hook. Every
//! accepted stream is wrapped in [`JsonErrors`], which recognises such a canned head on its way
//! out (status >= 400, `content-length: 0`, nothing after the head: our router never sends that,
//! all its errors have JSON bodies) and writes `{"detail": "..."}` in its place.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The response to send instead of `out`, when `out` is exactly one canned error head.
pub(crate) fn json_error_response(out: &[u8]) -> Option<Vec<u8>> {
    if !out.starts_with(b"HTTP/1.") {
        return None;
    }
    let head_len = out.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    if head_len != out.len() {
        return None;
    }
    let head = std::str::from_utf8(&out[..head_len - 4]).ok()?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let code: u16 = status_line.split(' ').nth(1)?.parse().ok()?;
    if code < 400 {
        return None;
    }
    let headers: Vec<&str> = lines.collect();
    let is_empty_length = |h: &&str| {
        h.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("content-length") && value.trim() == "0"
        })
    };
    if !headers.iter().any(is_empty_length) {
        return None;
    }
    let reason = status_line.splitn(3, ' ').nth(2).unwrap_or("Error");
    let detail = match code {
        400 => "Bad Request: the request could not be parsed as HTTP/1.1".to_string(),
        414 => "URI Too Long: the request target is over 64 KiB".to_string(),
        431 => "Request Header Fields Too Large".to_string(),
        _ => reason.to_string(),
    };
    let body = serde_json::json!({ "detail": detail }).to_string();
    let mut new = format!("{status_line}\r\n");
    for h in headers.iter().filter(|h| {
        !is_empty_length(h)
            && !h
                .split_once(':')
                .is_some_and(|(n, _)| n.trim().eq_ignore_ascii_case("content-type"))
    }) {
        new.push_str(h);
        new.push_str("\r\n");
    }
    new.push_str(&format!(
        "content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    ));
    Some(new.into_bytes())
}

/// A connection whose canned error responses get JSON bodies (see the module doc).
pub(crate) struct JsonErrors<I> {
    inner: I,
    /// A replacement response not yet fully written, and how much of it is.
    pending: Vec<u8>,
    written: usize,
}

impl<I> JsonErrors<I> {
    pub(crate) fn new(inner: I) -> Self {
        JsonErrors {
            inner,
            pending: Vec::new(),
            written: 0,
        }
    }
}

impl<I: AsyncWrite + Unpin> JsonErrors<I> {
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.pending.len() {
            let n =
                ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.pending.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for JsonErrors<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

// Not vectored: hyper then hands over each response head in one flat buffer.
impl<I: AsyncWrite + Unpin> AsyncWrite for JsonErrors<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_pending(cx))?;
        match json_error_response(buf) {
            Some(replacement) => {
                this.pending = replacement;
                // Taken in whole; flush and shutdown finish writing it.
                if let Poll::Ready(Err(e)) = this.poll_pending(cx) {
                    return Poll::Ready(Err(e));
                }
                Poll::Ready(Ok(buf.len()))
            }
            None => Pin::new(&mut this.inner).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_pending(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_pending(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    const CANNED_414: &[u8] = b"HTTP/1.1 414 URI Too Long\r\nconnection: close\r\ncontent-length: 0\r\ndate: Mon, 23 Nov 2026 14:31:49 GMT\r\n\r\n";

    fn split(resp: &[u8]) -> (String, serde_json::Value) {
        let text = String::from_utf8(resp.to_vec()).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let length = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap();
        assert_eq!(length.parse::<usize>().unwrap(), body.len(), "{text}");
        (head.to_string(), serde_json::from_str(body).unwrap())
    }

    #[test]
    fn canned_heads_get_a_json_body() {
        let out = json_error_response(CANNED_414).unwrap();
        let (head, body) = split(&out);
        assert!(head.starts_with("HTTP/1.1 414 URI Too Long\r\n"), "{head}");
        assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
        assert!(
            head.contains("\r\ncontent-type: application/json\r\n"),
            "{head}"
        );
        assert!(!head.contains("content-length: 0"), "{head}");
        assert!(body["detail"].as_str().unwrap().starts_with("URI Too Long"));
        for (canned, code) in [
            (
                &b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n"[..],
                "400",
            ),
            (
                b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\n\r\n",
                "431",
            ),
        ] {
            let (head, body) = split(&json_error_response(canned).unwrap());
            assert!(head.starts_with(&format!("HTTP/1.1 {code} ")), "{head}");
            assert!(body["detail"].is_string());
        }
    }

    #[test]
    fn everything_else_passes_untouched() {
        for out in [
            // Success, even when empty.
            &b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"[..],
            // Our own errors have bodies.
            b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 22\r\n\r\n{\"detail\":\"Not Found\"}",
            // A head whose body comes in a later write.
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 22\r\n\r\n",
            // Not a whole head, or not a head at all.
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n",
            b"{\"detail\": \"HTTP/1.1 400\"}",
            b"",
        ] {
            assert_eq!(json_error_response(out), None, "{}", String::from_utf8_lossy(out));
        }
    }

    #[tokio::test]
    async fn the_wrapper_writes_the_replacement_through_a_slow_pipe() {
        // A 7-byte pipe forces partial writes of the replacement.
        let (a, mut b) = tokio::io::duplex(7);
        let writer = tokio::spawn(async move {
            let mut w = JsonErrors::new(a);
            w.write_all(CANNED_414).await.unwrap();
            w.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut b, &mut got)
            .await
            .unwrap();
        writer.await.unwrap();
        assert_eq!(got, json_error_response(CANNED_414).unwrap());
    }
}
