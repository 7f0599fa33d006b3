//! `GET /api/compute_units/`, streamed: rows go from the database to the socket in chunks,
//! with no intermediate copy of the list, so memory stays bounded at any inventory size.
//!
//! - **Bytes.** [`write_unit`] writes each row as exactly the JSON that serializing
//!   [`ComputeUnitResponse`] gives (same fields, order and escapes), from the row's borrowed
//!   text; a test holds the two together.
//! - **Repeated reads.** Each read first gets the inventory's change stamp, in the same
//!   snapshot as the rows ([`crate::store::Inventory::list_units`]). The stamp gives the
//!   `ETag`: a matching `If-None-Match` is answered `304` without reading a row. A list up to
//!   [`ENTRY_MAX`] is kept in [`ListCache`] under its filter and stamp, so an unchanged
//!   inventory answers from memory; any change, by any process, moves the stamp.
//!   A larger list is kept in an unnamed temporary file (`O_TMPFILE` in the cache directory:
//!   the page cache holds it, which the kernel can reclaim, not the process's memory) and
//!   sent from there.
//! - **gzip** when the client accepts it (`Accept-Encoding`), compressed as it streams.
//!
//! A database error before the first chunk is an ordinary error answer; after it, the
//! connection is cut (the client sees a truncated body, never a well-formed wrong list).

#[cfg(test)]
use super::schema::ComputeUnitResponse;
use super::{ApiError, App};
use crate::store::{StoreError, UnitFilter, UnitRow};
use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// Bytes of JSON gathered before they are sent (compressed, a chunk is smaller).
const CHUNK: usize = 64 * 1024;
/// Chunks in flight between the database reader and the socket.
const IN_FLIGHT: usize = 4;
/// The largest list body kept in the cache (larger ones are streamed every time).
pub(crate) const ENTRY_MAX: usize = 8 * 1024 * 1024;
/// All cached bodies together.
const CACHE_MAX: usize = 32 * 1024 * 1024;
/// A cached body not asked for this long is dropped (an idle service keeps little memory).
const CACHE_IDLE: Duration = Duration::from_secs(60);
/// All cached files together (each is one list of any size).
const FILES_MAX: u64 = 1024 * 1024 * 1024;
/// Bytes read from a cached file per chunk sent.
const FILE_CHUNK: usize = 256 * 1024;
/// Distinct range texts remembered per list (their canonical and expanded forms).
const RANGES_KEPT: usize = 4096;

// ---- the JSON of a row -----------------------------------------------------------------

fn string(out: &mut Vec<u8>, s: &str) {
    // serde_json's own escaping, so the bytes are what `Json(...)` gave.
    let _ = serde_json::to_writer(&mut *out, s);
}

fn opt_string(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => string(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

/// What a stored range text turns into in an answer, remembered per list: a handful of
/// layouts repeat over thousands of servers.
#[derive(Default)]
pub(crate) struct Ranges {
    cpus: HashMap<String, Arc<(String, String)>>,
    ports: HashMap<String, Arc<str>>,
}

impl Ranges {
    /// The canonical CPU list and every CPU, comma separated.
    fn cpus(&mut self, text: &str) -> Result<Arc<(String, String)>, StoreError> {
        if let Some(v) = self.cpus.get(text) {
            return Ok(v.clone());
        }
        let list: crate::model::CpuList = text
            .parse()
            .map_err(|e| StoreError::Corrupt(format!("cpu_range: {e}")))?;
        let every = list
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let v = Arc::new((list.to_string(), every));
        if self.cpus.len() < RANGES_KEPT {
            self.cpus.insert(text.to_string(), v.clone());
        }
        Ok(v)
    }

    fn ports(&mut self, text: &str) -> Result<Arc<str>, StoreError> {
        if let Some(v) = self.ports.get(text) {
            return Ok(v.clone());
        }
        let ports: crate::model::PortRanges = text
            .parse()
            .map_err(|e| StoreError::Corrupt(format!("ports_range: {e}")))?;
        let v: Arc<str> = ports.to_string().into();
        if self.ports.len() < RANGES_KEPT {
            self.ports.insert(text.to_string(), v.clone());
        }
        Ok(v)
    }
}

/// Appends `u` as the JSON object of [`ComputeUnitResponse`].
pub(crate) fn write_unit(
    out: &mut Vec<u8>,
    u: &UnitRow<'_>,
    ranges: &mut Ranges,
) -> Result<(), StoreError> {
    let status: crate::store::UnitStatus = u
        .status
        .parse()
        .map_err(|e| StoreError::Corrupt(format!("status: {e}")))?;
    let cpus = ranges.cpus(u.cpu_range)?;
    let ports = ranges.ports(u.ports_range)?;
    out.extend_from_slice(b"{\"compute_id\":");
    string(out, u.compute_id);
    out.extend_from_slice(b",\"hostname\":");
    string(out, u.hostname);
    out.extend_from_slice(b",\"ip\":");
    string(out, u.ip);
    let _ = write!(out, ",\"cpu_count\":{},\"cpu_range\":", u.cpu_count);
    string(out, &cpus.0);
    out.extend_from_slice(b",\"region\":");
    string(out, u.region);
    out.extend_from_slice(b",\"zone\":");
    string(out, u.zone);
    out.extend_from_slice(b",\"status\":");
    string(out, status.as_str());
    out.extend_from_slice(b",\"started_at\":");
    opt_string(out, u.started_at);
    out.extend_from_slice(b",\"tags\":");
    match u.tags {
        // Parsed and written again, as the struct did: a row written by hand in another
        // layout still gives the same answer, and a corrupt one an error, never bad JSON.
        Some(t) => {
            let v: serde_json::Value =
                serde_json::from_str(t).map_err(|e| StoreError::Corrupt(format!("tags: {e}")))?;
            let _ = serde_json::to_writer(&mut *out, &v);
        }
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"cpu_list\":");
    string(out, &cpus.1);
    out.extend_from_slice(b",\"ports_range\":");
    string(out, &ports);
    out.extend_from_slice(b",\"user\":");
    string(out, u.user);
    let _ = write!(out, ",\"uid\":{},\"allocated_by\":", u.uid);
    opt_string(out, u.allocated_by);
    out.extend_from_slice(b",\"problem\":");
    opt_string(out, u.problem);
    out.push(b'}');
    Ok(())
}

// ---- the channel between the database reader (a blocking thread) and the body ---------

/// What the reader sends.
enum Msg {
    /// The first chunk of a list being read, with its ETag.
    Head {
        etag: String,
        first: Bytes,
    },
    Data(Bytes),
    /// The whole answer from the cache.
    Whole {
        etag: String,
        chunks: Arc<[Bytes]>,
    },
    NotModified(String),
    Failed(StoreError),
}

struct Queue {
    items: VecDeque<Msg>,
    /// The reader is done (or gone).
    closed: bool,
    /// The body was dropped: the client went away.
    gone: bool,
    waker: Option<Waker>,
}

/// A bounded channel whose sender blocks on a plain thread (the reader may run inside a
/// database runtime, where an async runtime's blocking send refuses to) and whose receiver
/// is polled by the body.
struct Shared {
    q: Mutex<Queue>,
    room: Condvar,
}

struct Sender(Arc<Shared>);
struct Receiver(Arc<Shared>);

fn channel() -> (Sender, Receiver) {
    let s = Arc::new(Shared {
        q: Mutex::new(Queue {
            items: VecDeque::new(),
            closed: false,
            gone: false,
            waker: None,
        }),
        room: Condvar::new(),
    });
    (Sender(s.clone()), Receiver(s))
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.q.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Sender {
    /// Waits for room; false when the receiver is gone.
    fn send(&self, m: Msg) -> bool {
        let mut q = self.0.lock();
        while q.items.len() >= IN_FLIGHT && !q.gone {
            q = self.0.room.wait(q).unwrap_or_else(|p| p.into_inner());
        }
        if q.gone {
            return false;
        }
        q.items.push_back(m);
        if let Some(w) = q.waker.take() {
            w.wake();
        }
        true
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        let mut q = self.0.lock();
        q.closed = true;
        if let Some(w) = q.waker.take() {
            w.wake();
        }
    }
}

impl Receiver {
    fn poll_recv(&self, cx: &mut Context<'_>) -> Poll<Option<Msg>> {
        let mut q = self.0.lock();
        if let Some(m) = q.items.pop_front() {
            self.0.room.notify_one();
            return Poll::Ready(Some(m));
        }
        if q.closed {
            return Poll::Ready(None);
        }
        q.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.0.lock().gone = true;
        self.0.room.notify_all();
    }
}

/// The response body: cached chunks, or the first chunk then what the reader sends.
enum ListBody {
    Cached { chunks: Arc<[Bytes]>, next: usize },
    Live { first: Option<Bytes>, rx: Receiver },
}

impl http_body::Body for ListBody {
    type Data = Bytes;
    type Error = StoreError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, StoreError>>> {
        match self.get_mut() {
            ListBody::Cached { chunks, next } => {
                let c = chunks.get(*next).cloned();
                *next += 1;
                Poll::Ready(c.map(|c| Ok(http_body::Frame::data(c))))
            }
            ListBody::Live { first, rx } => {
                if let Some(c) = first.take() {
                    return Poll::Ready(Some(Ok(http_body::Frame::data(c))));
                }
                match rx.poll_recv(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Some(Msg::Data(c))) => {
                        Poll::Ready(Some(Ok(http_body::Frame::data(c))))
                    }
                    Poll::Ready(Some(Msg::Failed(e))) => Poll::Ready(Some(Err(e))),
                    // Anything else after the head is a bug of the reader; end the body cut.
                    Poll::Ready(Some(_)) => Poll::Ready(Some(Err(StoreError::Stopped(
                        "unexpected message after the first chunk".into(),
                    )))),
                    Poll::Ready(None) => Poll::Ready(None),
                }
            }
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            ListBody::Cached { chunks, next } => http_body::SizeHint::with_exact(
                chunks[(*next).min(chunks.len())..]
                    .iter()
                    .map(|c| c.len() as u64)
                    .sum(),
            ),
            ListBody::Live { .. } => http_body::SizeHint::default(),
        }
    }
}

// ---- the cache --------------------------------------------------------------------------

/// A cached answer's bytes.
#[derive(Clone)]
enum Kept {
    Mem(Arc<[Bytes]>),
    /// An unnamed file (gone with its last handle) of `len` bytes.
    File(Arc<std::fs::File>, u64),
}

struct Entry {
    stamp: String,
    body: Kept,
    /// Bytes of memory (a file's are counted apart).
    size: usize,
    used: Instant,
}

impl Entry {
    fn file_len(&self) -> u64 {
        match &self.body {
            Kept::File(_, n) => *n,
            Kept::Mem(_) => 0,
        }
    }
}

/// Recent list answers, by filter and encoding, valid while the inventory's stamp is the one
/// they were read at.
pub(crate) struct ListCache {
    entries: Mutex<HashMap<(String, bool), Entry>>,
    /// Part of every ETag: a database replaced under a running service (a restored backup)
    /// cannot make a client's old ETag match a different list.
    nonce: u64,
    /// Where lists larger than `mem_max` are kept (`None`: they are not).
    dir: Option<std::path::PathBuf>,
    /// The largest list kept in memory ([`ENTRY_MAX`] unless set).
    mem_max: usize,
}

impl Default for ListCache {
    fn default() -> Self {
        let mut b = [0u8; 8];
        let _ = getrandom::fill(&mut b);
        ListCache {
            entries: Mutex::new(HashMap::new()),
            nonce: u64::from_le_bytes(b),
            dir: None,
            mem_max: ENTRY_MAX,
        }
    }
}

/// A new unnamed file in `dir`, readable and writable by this process only.
fn unnamed_file(dir: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
        .open(dir)
}

impl ListCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, bool), Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn etag(&self, stamp: &str, gzip: bool) -> String {
        let h = crate::auth::sha256_hex(stamp);
        let h = h.get(..16).unwrap_or(&h);
        format!(
            "\"{:016x}-{h}{}\"",
            self.nonce,
            if gzip { "-gz" } else { "" }
        )
    }

    /// Keeps lists larger than [`ENTRY_MAX`] in unnamed files in `dir` (a directory only root
    /// can write: the service's cache or state directory).
    pub(crate) fn set_dir(&mut self, dir: Option<std::path::PathBuf>) {
        self.dir = dir;
    }

    /// Sets the largest list kept in memory (at most [`ENTRY_MAX`]); larger ones go to files.
    pub(crate) fn set_memory_max(&mut self, bytes: usize) {
        self.mem_max = bytes.min(ENTRY_MAX);
    }

    fn get(&self, key: &(String, bool), stamp: &str) -> Option<Kept> {
        let mut entries = self.lock();
        let e = entries.get_mut(key)?;
        if e.stamp != stamp {
            return None;
        }
        e.used = Instant::now();
        Some(e.body.clone())
    }

    fn put(&self, key: (String, bool), stamp: String, body: Kept) {
        let size: usize = match &body {
            Kept::Mem(chunks) => chunks.iter().map(Bytes::len).sum(),
            Kept::File(..) => 0,
        };
        if size > self.mem_max {
            return;
        }
        let file_len = match &body {
            Kept::File(_, n) => *n,
            Kept::Mem(_) => 0,
        };
        let mut entries = self.lock();
        let now = Instant::now();
        entries.retain(|_, e| now.duration_since(e.used) < CACHE_IDLE);
        entries.remove(&key);
        let mut total: usize = entries.values().map(|e| e.size).sum();
        let mut files: u64 = entries.values().map(Entry::file_len).sum();
        while total + size > CACHE_MAX || files + file_len > FILES_MAX {
            let Some(oldest) = entries
                .iter()
                .min_by_key(|(_, e)| e.used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some(e) = entries.remove(&oldest) {
                total -= e.size;
                files -= e.file_len();
            }
        }
        entries.insert(
            key,
            Entry {
                stamp,
                body,
                size,
                used: now,
            },
        );
    }

    /// Drops what was not asked for lately (called by the housekeeping tick); when answers
    /// held in memory went, the allocator gives their pages back to the system.
    pub(crate) fn expire(&self) {
        let now = Instant::now();
        let mut freed = 0;
        self.lock().retain(|_, e| {
            let keep = now.duration_since(e.used) < CACHE_IDLE;
            if !keep {
                freed += e.size;
            }
            keep
        });
        if freed > 0 {
            trim();
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}

// ---- the reader -------------------------------------------------------------------------

/// Gathers rows into chunks (compressed when asked) and sends them; keeps a copy of the
/// chunks for the cache while the list is small enough.
struct Writer {
    tx: Sender,
    etag: String,
    raw: Vec<u8>,
    gz: Option<flate2::write::GzEncoder<Vec<u8>>>,
    rows: usize,
    head_sent: bool,
    /// The answer so far, for the cache: in memory up to `mem_max`, then in a file of
    /// `dir` (`None`: it will not be cached).
    kept: Option<Vec<Bytes>>,
    kept_size: usize,
    file: Option<std::fs::File>,
    dir: Option<std::path::PathBuf>,
    mem_max: usize,
    ranges: Ranges,
}

impl Writer {
    /// Keeps `chunk` for the cache, moving to a file past `mem_max`.
    fn keep(&mut self, chunk: &Bytes) {
        self.kept_size += chunk.len();
        if let Some(f) = &mut self.file {
            if f.write_all(chunk).is_err() {
                self.file = None;
            }
            return;
        }
        let Some(kept) = &mut self.kept else {
            return;
        };
        kept.push(chunk.clone());
        if self.kept_size <= self.mem_max {
            return;
        }
        let kept = self.kept.take().unwrap_or_default();
        let Some(dir) = &self.dir else {
            return;
        };
        match unnamed_file(dir) {
            Ok(mut f) => {
                if kept.iter().all(|c| f.write_all(c).is_ok()) {
                    self.file = Some(f);
                }
            }
            Err(e) => tracing::warn!(
                dir = %dir.display(), error = %e,
                "cannot keep a large list in a temporary file; it is not cached"
            ),
        }
    }

    /// What the cache keeps of a list that ended well.
    fn kept(&mut self) -> Option<Kept> {
        if let Some(f) = self.file.take() {
            return Some(Kept::File(Arc::new(f), self.kept_size as u64));
        }
        self.kept.take().map(|k| Kept::Mem(k.into()))
    }

    fn new(tx: Sender, gzip: bool, cache: &ListCache) -> Writer {
        let mut raw = Vec::with_capacity(CHUNK + 4096);
        raw.push(b'[');
        Writer {
            tx,
            etag: String::new(),
            raw,
            gz: gzip
                .then(|| flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast())),
            rows: 0,
            head_sent: false,
            kept: Some(Vec::new()),
            kept_size: 0,
            file: None,
            dir: cache.dir.clone(),
            mem_max: cache.mem_max,
            ranges: Ranges::default(),
        }
    }

    fn row(&mut self, u: &UnitRow<'_>) -> Result<(), StoreError> {
        if self.rows > 0 {
            self.raw.push(b',');
        }
        self.rows += 1;
        write_unit(&mut self.raw, u, &mut self.ranges)?;
        if self.raw.len() >= CHUNK {
            self.flush(false)?;
        }
        Ok(())
    }

    /// Sends what is gathered; `last` ends the list (and the gzip stream).
    fn flush(&mut self, last: bool) -> Result<(), StoreError> {
        if last {
            self.raw.push(b']');
        }
        let chunk = match &mut self.gz {
            None => Bytes::from(std::mem::replace(
                &mut self.raw,
                Vec::with_capacity(CHUNK + 4096),
            )),
            Some(gz) => {
                let io = |e: std::io::Error| StoreError::Stopped(format!("gzip: {e}"));
                gz.write_all(&self.raw).map_err(io)?;
                self.raw.clear();
                if last {
                    let gz = self.gz.take().map(|g| g.finish()).transpose().map_err(io)?;
                    Bytes::from(gz.unwrap_or_default())
                } else {
                    Bytes::from(std::mem::take(gz.get_mut()))
                }
            }
        };
        if chunk.is_empty() && !last {
            return Ok(());
        }
        self.keep(&chunk);
        let m = if self.head_sent {
            Msg::Data(chunk)
        } else {
            self.head_sent = true;
            Msg::Head {
                etag: self.etag.clone(),
                first: chunk,
            }
        };
        if self.tx.send(m) {
            Ok(())
        } else {
            Err(StoreError::Stopped("the client went away".into()))
        }
    }
}

/// Whether `If-None-Match` names `etag` (or is `*`).
fn matches_etag(if_none_match: &str, etag: &str) -> bool {
    if_none_match
        .split(',')
        .map(str::trim)
        .any(|t| t == "*" || t == etag || t.strip_prefix("W/") == Some(etag))
}

/// Whether `Accept-Encoding` accepts gzip (a `q=0` refuses it).
pub(crate) fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|item| {
            let mut parts = item.split(';').map(str::trim);
            let coding = parts.next().unwrap_or("");
            let refused = parts.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            (coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip"))
                && !refused
        })
}

/// Reads the list on this (blocking) thread and sends it to `tx`.
fn read(app: &App, f: &UnitFilter, gzip: bool, if_none_match: Option<&str>, tx: Sender) {
    let key = (format!("{f:?}"), gzip);
    let w = std::cell::RefCell::new(Writer::new(tx, gzip, &app.list_cache));
    let mut stamp_seen: Option<String> = None;
    let mut hit: Option<(String, Kept)> = None;
    let r = app.kloigos.list_units(
        f,
        &mut |stamp| {
            let etag = app.list_cache.etag(stamp, gzip);
            let mut w = w.borrow_mut();
            if if_none_match.is_some_and(|inm| matches_etag(inm, &etag)) {
                w.tx.send(Msg::NotModified(etag));
                return false;
            }
            if let Some(kept) = app.list_cache.get(&key, stamp) {
                // Sent once the read transaction is over.
                hit = Some((etag, kept));
                return false;
            }
            w.etag = etag;
            stamp_seen = Some(stamp.to_string());
            true
        },
        &mut |row| w.borrow_mut().row(row),
    );
    let mut w = w.into_inner();
    if let (Ok(()), Some((etag, kept))) = (&r, hit) {
        send_kept(&w.tx, etag, kept);
        return;
    }
    let r = match r {
        Ok(()) if stamp_seen.is_some() => w.flush(true).map_err(crate::service::OpError::from),
        other => other,
    };
    match r {
        Ok(()) => {
            let big = w.kept_size > w.mem_max;
            if let (Some(stamp), Some(kept)) = (stamp_seen, w.kept()) {
                app.list_cache.put(key, stamp, kept);
            }
            drop(w);
            if big {
                // A large list went through hundreds of chunks allocated here and freed on
                // the socket's thread: hand the freed memory back to the system now.
                trim();
            }
        }
        Err(crate::service::OpError::Store(StoreError::Stopped(_))) => {}
        Err(e) => {
            tracing::error!(error = %crate::error::Chain(&e), "list of compute units failed");
            let e = match e {
                crate::service::OpError::Store(e) => e,
                other => StoreError::Stopped(other.to_string()),
            };
            w.tx.send(Msg::Failed(e));
        }
    }
}

/// Gives the allocator's free pages back to the system (every arena's: the chunks of an
/// answer are allocated on a blocking thread and freed on the socket's).
fn trim() {
    // SAFETY: malloc_trim only releases free memory of the allocator.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Sends a cached answer: from memory at once, from its file chunk by chunk.
fn send_kept(tx: &Sender, etag: String, kept: Kept) {
    match kept {
        Kept::Mem(chunks) => {
            tx.send(Msg::Whole { etag, chunks });
        }
        Kept::File(file, len) => {
            use std::os::unix::fs::FileExt;
            let mut at = 0u64;
            let mut etag = Some(etag);
            while at < len || etag.is_some() {
                let n = usize::try_from(len - at)
                    .unwrap_or(FILE_CHUNK)
                    .min(FILE_CHUNK);
                let mut buf = vec![0u8; n];
                if let Err(e) = file.read_exact_at(&mut buf, at) {
                    tx.send(Msg::Failed(StoreError::Stopped(format!(
                        "reading a cached list: {e}"
                    ))));
                    return;
                }
                at += n as u64;
                let chunk = Bytes::from(buf);
                let m = match etag.take() {
                    Some(etag) => Msg::Head { etag, first: chunk },
                    None => Msg::Data(chunk),
                };
                if !tx.send(m) {
                    return;
                }
            }
        }
    }
}

/// The answer to a list request: see the module's documentation.
pub(super) async fn answer(
    app: Arc<App>,
    f: UnitFilter,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let gzip = accepts_gzip(headers);
    let if_none_match = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let (tx, rx) = channel();
    tokio::task::spawn_blocking(move || read(&app, &f, gzip, if_none_match.as_deref(), tx));
    let first = std::future::poll_fn(|cx| rx.poll_recv(cx)).await;
    let (etag, body) = match first {
        Some(Msg::Head { etag, first }) => (
            etag,
            ListBody::Live {
                first: Some(first),
                rx,
            },
        ),
        Some(Msg::Whole { etag, chunks }) => (etag, ListBody::Cached { chunks, next: 0 }),
        Some(Msg::NotModified(etag)) => {
            let mut r = StatusCode::NOT_MODIFIED.into_response();
            set_headers(r.headers_mut(), &etag, false);
            return Ok(r);
        }
        Some(Msg::Failed(e)) => return Err(crate::service::OpError::Store(e).into()),
        Some(Msg::Data(_)) | None => {
            return Err(ApiError::detail(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal error: the list ended before it began",
            ));
        }
    };
    let mut r = Response::new(axum::body::Body::new(body));
    set_headers(r.headers_mut(), &etag, gzip);
    Ok(r)
}

fn set_headers(h: &mut HeaderMap, etag: &str, gzip: bool) {
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(v) = HeaderValue::from_str(etag) {
        h.insert(header::ETAG, v);
    }
    // Clients may keep it, but ask again each time (with If-None-Match).
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    if gzip {
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Unit;

    fn row_of(u: &Unit) -> (String, String, Option<String>) {
        (
            u.cpu_range.to_string(),
            u.ports_range.to_string(),
            u.tags.as_ref().map(|t| t.to_string()),
        )
    }

    fn unit(status: crate::store::UnitStatus, tags: Option<serde_json::Value>) -> Unit {
        Unit {
            compute_id: "h\"1_0-3".into(),
            hostname: "h\"1\\é\u{1}".into(),
            ip: "10.0.0.1".into(),
            region: "us-east</script>".into(),
            zone: "a\nb".into(),
            cpu_range: "0-3,8,10-20:2".parse().unwrap(),
            cpu_count: 11,
            first_cpu: 0,
            uid: 20000,
            user: "c0-3".into(),
            ports_range: "2000-2399".parse().unwrap(),
            status,
            started_at: Some("2026-11-24T00:00:00Z".into()),
            tags,
            ssh_public_key: Some("ssh-ed25519 AAAA".into()),
            allocated_by: None,
            updated_at: "2026-11-24T00:00:00Z".into(),
            problem: Some("it \"broke\"".into()),
            claim: None,
        }
    }

    #[test]
    fn a_row_is_written_as_the_response_struct_serializes() {
        let tags = [
            None,
            Some(serde_json::json!({})),
            Some(
                serde_json::json!({"z": 1, "a": [1, 2.5, "x"], "deployment_id": "d\u{7f}é", "n": null}),
            ),
        ];
        let mut ranges = Ranges::default();
        for &status in crate::store::UnitStatus::ALL {
            for t in &tags {
                let u = unit(status, t.clone());
                let (cpu, ports, tag_text) = row_of(&u);
                let row = UnitRow {
                    compute_id: &u.compute_id,
                    hostname: &u.hostname,
                    ip: &u.ip,
                    region: &u.region,
                    zone: &u.zone,
                    cpu_range: &cpu,
                    cpu_count: u.cpu_count,
                    uid: u.uid,
                    user: &u.user,
                    ports_range: &ports,
                    status: status.as_str(),
                    started_at: u.started_at.as_deref(),
                    tags: tag_text.as_deref(),
                    allocated_by: u.allocated_by.as_deref(),
                    problem: u.problem.as_deref(),
                };
                let mut out = Vec::new();
                write_unit(&mut out, &row, &mut ranges).unwrap();
                let want = serde_json::to_vec(&ComputeUnitResponse::from(&u)).unwrap();
                assert_eq!(
                    String::from_utf8(out).unwrap(),
                    String::from_utf8(want).unwrap()
                );
            }
        }
    }

    #[test]
    fn a_corrupt_row_is_an_error_not_json() {
        let u = unit(crate::store::UnitStatus::Free, None);
        let mut ranges = Ranges::default();
        for (cpu, ports, status, tags) in [
            ("0-", "2000-2399", "FREE", None),
            ("0-3", "x", "FREE", None),
            ("0-3", "2000-2399", "GONE", None),
            ("0-3", "2000-2399", "FREE", Some("{not json")),
        ] {
            let row = UnitRow {
                compute_id: &u.compute_id,
                hostname: &u.hostname,
                ip: &u.ip,
                region: &u.region,
                zone: &u.zone,
                cpu_range: cpu,
                cpu_count: 4,
                uid: 1,
                user: &u.user,
                ports_range: ports,
                status,
                started_at: None,
                tags,
                allocated_by: None,
                problem: None,
            };
            let e = write_unit(&mut Vec::new(), &row, &mut ranges).unwrap_err();
            assert!(matches!(e, StoreError::Corrupt(_)), "{e}");
        }
    }

    #[test]
    fn etags_and_encodings() {
        let c = ListCache::default();
        let a = c.etag("s1", false);
        assert_ne!(a, c.etag("s2", false));
        assert_ne!(a, c.etag("s1", true));
        assert_ne!(a, ListCache::default().etag("s1", false));
        assert!(matches_etag(&a, &a));
        assert!(matches_etag(&format!("\"x\", W/{a}"), &a));
        assert!(matches_etag("*", &a));
        assert!(!matches_etag("\"x\"", &a));
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::ACCEPT_ENCODING, HeaderValue::from_str(v).unwrap());
            accepts_gzip(&m)
        };
        assert!(h("gzip"));
        assert!(h("deflate, GZIP;q=0.5, br"));
        assert!(!h("gzip;q=0"));
        assert!(!h("br, deflate"));
        assert!(!h("identity"));
        assert!(!accepts_gzip(&HeaderMap::new()));
    }

    #[test]
    fn the_cache_keeps_small_lists_for_their_stamp_within_its_budget() {
        let c = ListCache::default();
        let k = |s: &str| (s.to_string(), false);
        let mem = |v: Vec<Bytes>| Kept::Mem(v.into());
        c.put(k("a"), "s1".into(), mem(vec![Bytes::from_static(b"[]")]));
        assert!(c.get(&k("a"), "s1").is_some());
        assert!(c.get(&k("a"), "s2").is_none(), "another stamp");
        assert!(
            c.get(&(String::from("a"), true), "s1").is_none(),
            "another encoding"
        );
        let big = Bytes::from(vec![b' '; ENTRY_MAX + 1]);
        c.put(k("big"), "s1".into(), mem(vec![big]));
        assert!(c.get(&k("big"), "s1").is_none(), "too big to keep");
        let part = Bytes::from(vec![b' '; ENTRY_MAX]);
        for n in 0..8 {
            c.put(k(&format!("p{n}")), "s1".into(), mem(vec![part.clone()]));
        }
        assert!(c.len() <= CACHE_MAX / ENTRY_MAX + 1, "{}", c.len());
        assert!(c.get(&k("p7"), "s1").is_some(), "the newest stays");
        assert!(c.get(&k("p0"), "s1").is_none(), "the oldest went");
    }
}
