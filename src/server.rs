//! Listeners and the serving loop: sockets handed over by systemd (`LISTEN_FDS`) or bound with
//! `--listen`, HTTP/1 with hyper, the caller's identity attached to each request, readiness and
//! status reported with sd-notify, and an exit after a quiet period so socket activation can
//! start the service again on the next connection.
//!
//! No caller may exhaust it: headers must arrive within a timeout (which also closes idle
//! keep-alive connections, so none keeps the service from its idle exit). On the unix socket
//! each non-admin user, and all of them together, are capped while root and group `kloigos`
//! are not, so a local user cannot lock admins out. Over TCP, a loopback caller's local uid is
//! asked of the kernel ([`crate::peeruid`]): each user other than root is capped, all TCP
//! callers together are capped, and root is not, so no tenant can lock out a token holder
//! running as root. The uid never grants a role over TCP.

use crate::api::Peer;
use crate::canned::JsonErrors;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tower::ServiceExt;
use tracing::{info, warn};

/// A listening socket, before the async runtime takes it.
#[derive(Debug)]
pub enum Listener {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener, Option<PathBuf>),
}

impl Listener {
    pub(crate) fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map(|a| format!("http://{a}"))
                .unwrap_or_else(|_| "tcp".into()),
            Listener::Unix(l, path) => path
                .clone()
                .or_else(|| {
                    l.local_addr()
                        .ok()
                        .and_then(|a| a.as_pathname().map(|p| p.to_path_buf()))
                })
                .map(|p| format!("unix:{}", p.display()))
                .unwrap_or_else(|| "unix".into()),
        }
    }
}

/// The sockets systemd passed us. Must run before any thread exists: it reads and clears
/// `LISTEN_FDS`/`LISTEN_PID`.
pub fn from_systemd() -> io::Result<Vec<Listener>> {
    let mut fds = listenfd::ListenFd::from_env();
    let mut out = Vec::new();
    for i in 0..fds.len() {
        if let Ok(Some(l)) = fds.take_unix_listener(i) {
            out.push(Listener::Unix(l, None));
        } else if let Some(l) = fds.take_tcp_listener(i)? {
            out.push(Listener::Tcp(l));
        }
    }
    Ok(out)
}

/// Binds `ADDR`: a path (anything with a `/`) is a unix socket, otherwise `host:port`.
pub(crate) fn bind(addr: &str) -> io::Result<Listener> {
    if addr.contains('/') {
        let path = PathBuf::from(addr);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        // A socket file left by a previous run would make bind fail.
        if std::fs::symlink_metadata(&path).is_ok_and(|m| {
            use std::os::unix::fs::FileTypeExt;
            m.file_type().is_socket()
        }) {
            std::fs::remove_file(&path)?;
        }
        let l = std::os::unix::net::UnixListener::bind(&path)?;
        // Anyone may connect; peer credentials decide what they may do. Never through a link
        // someone put in the socket's place since the bind.
        nix::sys::stat::fchmodat(
            nix::fcntl::AT_FDCWD,
            &path,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            nix::sys::stat::FchmodatFlags::NoFollowSymlink,
        )
        .map_err(io::Error::from)?;
        Ok(Listener::Unix(l, Some(path)))
    } else {
        let l = std::net::TcpListener::bind(addr)?;
        Ok(Listener::Tcp(l))
    }
}

pub(crate) struct ServeOptions {
    /// Exit after this long with no open connection (None: serve until a signal).
    pub(crate) idle_timeout: Option<Duration>,
    /// What `STATUS=` says besides the sockets: worked out after `READY=1` (it may read the
    /// whole inventory's counts), and sent then.
    pub(crate) status: Box<dyn FnOnce() -> String + Send>,
    /// Time a client has to send a request's headers, or to start the next request on a
    /// kept-alive connection.
    pub(crate) header_timeout: Duration,
    pub(crate) caps: Caps,
    /// Background work under way (a joined host's pull): counts as activity for the idle
    /// exit, and a stop waits for it, up to [`BUSY_DRAIN`].
    pub(crate) busy: Option<Arc<dyn Fn() -> bool + Send + Sync>>,
}

/// How long a stop waits for background work (`ServeOptions::busy`): a pull's exchanges with
/// its hubs time out well before.
const BUSY_DRAIN: Duration = Duration::from_secs(60);

/// Most connections open at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Caps {
    /// Per local non-admin user on the unix socket, and per local user other than root over
    /// loopback TCP.
    pub(crate) per_user: usize,
    /// All local non-admin users together on the unix socket.
    pub(crate) users: usize,
    /// TCP, in all, root's loopback connections aside.
    pub(crate) tcp: usize,
}

/// What an open connection counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Counted {
    /// TCP from a peer whose local user is unknown (not on loopback, or gone): the total only.
    Tcp,
    /// TCP from a local user other than root: that user's cap and the total.
    TcpUser(u32),
    /// Unix socket, a non-admin user: that user's cap and all users' cap.
    User(u32),
}

/// Connections of one transport: in all, and per local user.
#[derive(Debug, Default)]
struct Pool {
    all: usize,
    per_uid: HashMap<u32, usize>,
}

impl Pool {
    fn admit(&mut self, uid: Option<u32>, per_user: usize, all: usize) -> bool {
        let n = uid.map_or(0, |u| self.per_uid.get(&u).copied().unwrap_or(0));
        if self.all >= all || (uid.is_some() && n >= per_user) {
            return false;
        }
        if let Some(u) = uid {
            self.per_uid.insert(u, n + 1);
        }
        self.all += 1;
        true
    }

    fn release(&mut self, uid: Option<u32>) {
        self.all = self.all.saturating_sub(1);
        if let Some(u) = uid
            && let Some(n) = self.per_uid.get_mut(&u)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_uid.remove(&u);
            }
        }
    }
}

/// Open connections, by what they count against. Admins' connections are not counted.
#[derive(Debug, Default)]
struct Counts {
    tcp: Pool,
    unix: Pool,
}

impl Counts {
    /// Takes a place for a new connection, if the caps leave one.
    fn admit(&mut self, what: Counted, caps: &Caps) -> bool {
        match what {
            Counted::Tcp => self.tcp.admit(None, caps.per_user, caps.tcp),
            Counted::TcpUser(uid) => self.tcp.admit(Some(uid), caps.per_user, caps.tcp),
            Counted::User(uid) => self.unix.admit(Some(uid), caps.per_user, caps.users),
        }
    }

    fn release(&mut self, what: Counted) {
        match what {
            Counted::Tcp => self.tcp.release(None),
            Counted::TcpUser(uid) => self.tcp.release(Some(uid)),
            Counted::User(uid) => self.unix.release(Some(uid)),
        }
    }
}

/// A connection's place under the caps, given back when the connection ends.
struct Place {
    counts: Arc<Mutex<Counts>>,
    what: Counted,
}

impl Place {
    fn take(counts: &Arc<Mutex<Counts>>, what: Counted, caps: &Caps) -> Option<Place> {
        lock(counts).admit(what, caps).then(|| Place {
            counts: counts.clone(),
            what,
        })
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        lock(&self.counts).release(self.what);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether a local user is an admin (root or group `kloigos`), remembered for a few seconds
/// so a flood of connections costs one lookup.
#[derive(Default)]
struct Admins {
    known: Mutex<HashMap<(u32, u32), (bool, Instant)>>,
}

impl Admins {
    const TTL: Duration = Duration::from_secs(10);

    async fn is_admin(&self, uid: u32, gid: u32) -> bool {
        if uid == 0 {
            return true;
        }
        let now = Instant::now();
        if let Some((admin, at)) = lock(&self.known).get(&(uid, gid))
            && now.duration_since(*at) < Self::TTL
        {
            return *admin;
        }
        let admin = tokio::task::spawn_blocking(move || {
            crate::auth::unix_caller(uid, gid).role == crate::auth::Role::Admin
        })
        .await
        .unwrap_or(false);
        let mut known = lock(&self.known);
        if known.len() >= 4096 {
            known.clear();
        }
        known.insert((uid, gid), (admin, now));
        admin
    }
}

/// The local uid behind a loopback TCP connection, if the kernel can tell. A failure leaves the
/// connection under the total cap only; it is logged as a warning once, then at debug level
/// (if the kernel always refuses, every connection would log it).
fn tcp_peer_uid(s: &tokio::net::TcpStream, peer: std::net::SocketAddr) -> Option<u32> {
    use std::sync::atomic::{AtomicBool, Ordering};
    static WARNED: AtomicBool = AtomicBool::new(false);
    let ours = s.local_addr().ok()?;
    match crate::peeruid::local_uid(peer, ours) {
        Ok(None) => {
            tracing::debug!(%peer, "the local user calling over TCP is unknown (its socket is gone)");
            None
        }
        Ok(uid) => uid,
        Err(e) => {
            if WARNED.swap(true, Ordering::Relaxed) {
                tracing::debug!(error = %e, %peer, "cannot tell which local user is calling over TCP");
            } else {
                warn!(error = %e, %peer, "cannot tell which local user is calling over TCP; such callers count against the total cap only (logged once)");
            }
            None
        }
    }
}

/// Longest a connection stays open. The header and body timeouts bound a slow sender; this
/// bounds a client that never reads a large answer (no hyper timeout covers writing). An
/// operation in progress finishes anyway: its work runs on a blocking thread.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(600);

/// Said to a connection over the caps, without reading its request, before closing it.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
content-length: 44\r\nretry-after: 1\r\nconnection: close\r\n\r\n\
{\"detail\":\"too many connections; try again\"}";

/// Raises the soft limit of open files to the hard limit (systemd sets both with
/// `LimitNOFILE=`; this is for runs outside it).
pub(crate) fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                warn!(error = %e, soft, hard, "cannot raise the open files limit");
            }
        }
        Ok(_) => {}
        Err(e) => warn!(error = %e, "cannot read the open files limit"),
    }
}

fn notify(states: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        warn!(error = %e, "sd_notify failed");
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers, serve until killed.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: shutting down"),
        _ = int.recv() => info!("SIGINT: shutting down"),
    }
}

/// Serves `app` on every listener until a signal or the idle timeout.
pub(crate) async fn serve(
    listeners: Vec<Listener>,
    app: Router,
    opts: ServeOptions,
) -> io::Result<()> {
    let graceful = Arc::new(hyper_util::server::graceful::GracefulShutdown::new());
    let counts = Arc::new(Mutex::new(Counts::default()));
    let admins = Arc::new(Admins::default());
    let (caps, header_timeout) = (opts.caps, opts.header_timeout);
    let last_active = Arc::new(Mutex::new(Instant::now()));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let mut described = Vec::new();
    for l in listeners {
        described.push(l.describe());
        let app = app.clone();
        let graceful = graceful.clone();
        let last_active = last_active.clone();
        let mut stop = stop_rx.clone();
        let counts = counts.clone();
        let admins = admins.clone();
        match l {
            Listener::Tcp(l) => {
                l.set_nonblocking(true)?;
                let l = tokio::net::TcpListener::from_std(l)?;
                tasks.spawn(async move {
                    loop {
                        tokio::select! {
                            r = l.accept() => match r {
                                Ok((s, addr)) => {
                                    *lock(&last_active) = Instant::now();
                                    let _ = s.set_nodelay(true);
                                    if !crate::peeruid::is_loopback(addr.ip()) {
                                        let Some(place) = Place::take(&counts, Counted::Tcp, &caps) else {
                                            let _ = s.try_write(BUSY);
                                            continue;
                                        };
                                        spawn_conn(TokioIo::new(s), Peer::Tcp { addr, uid: None }, &app, &graceful, header_timeout, Some(place));
                                        continue;
                                    }
                                    // A local caller: its uid, asked of the kernel, decides
                                    // which caps it counts against (never its role).
                                    let (app, graceful, counts) = (app.clone(), graceful.clone(), counts.clone());
                                    tokio::spawn(async move {
                                        let uid = tcp_peer_uid(&s, addr);
                                        let what = match uid {
                                            Some(0) => None,
                                            Some(uid) => Some(Counted::TcpUser(uid)),
                                            None => Some(Counted::Tcp),
                                        };
                                        let place = match what {
                                            None => None,
                                            Some(what) => match Place::take(&counts, what, &caps) {
                                                Some(p) => Some(p),
                                                None => {
                                                    tracing::debug!(?uid, "too many TCP connections from this user");
                                                    let _ = s.try_write(BUSY);
                                                    return;
                                                }
                                            },
                                        };
                                        spawn_conn(TokioIo::new(s), Peer::Tcp { addr, uid }, &app, &graceful, header_timeout, place);
                                    });
                                }
                                Err(e) => { warn!(error = %e, "accept failed"); tokio::time::sleep(Duration::from_millis(100)).await; }
                            },
                            _ = stop.changed() => break,
                        }
                    }
                });
            }
            Listener::Unix(l, _) => {
                l.set_nonblocking(true)?;
                let l = tokio::net::UnixListener::from_std(l)?;
                tasks.spawn(async move {
                    loop {
                        tokio::select! {
                            r = l.accept() => match r {
                                Ok((s, _)) => {
                                    *lock(&last_active) = Instant::now();
                                    let peer = match s.peer_cred() {
                                        Ok(c) => Peer::Unix { uid: c.uid(), gid: c.gid() },
                                        Err(_) => Peer::Unknown,
                                    };
                                    if let Peer::Unix { uid: 0, .. } = peer {
                                        spawn_conn(TokioIo::new(s), peer, &app, &graceful, header_timeout, None);
                                        continue;
                                    }
                                    // Everyone else: admins are not capped, others are (the
                                    // admin check may read the user and group databases).
                                    let (app, graceful, counts, admins) = (app.clone(), graceful.clone(), counts.clone(), admins.clone());
                                    tokio::spawn(async move {
                                        let (uid, admin) = match peer {
                                            Peer::Unix { uid, gid, .. } => (uid, admins.is_admin(uid, gid).await),
                                            _ => (u32::MAX, false),
                                        };
                                        let place = if admin {
                                            None
                                        } else {
                                            match Place::take(&counts, Counted::User(uid), &caps) {
                                                Some(p) => Some(p),
                                                None => {
                                                    tracing::debug!(uid, "too many connections from this user");
                                                    let _ = s.try_write(BUSY);
                                                    return;
                                                }
                                            }
                                        };
                                        spawn_conn(TokioIo::new(s), peer, &app, &graceful, header_timeout, place);
                                    });
                                }
                                Err(e) => { warn!(error = %e, "accept failed"); tokio::time::sleep(Duration::from_millis(100)).await; }
                            },
                            _ = stop.changed() => break,
                        }
                    }
                });
            }
        }
    }
    let listening = format!("listening on {}", described.join(", "));
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&listening),
    ]);
    let status = opts.status;
    tokio::task::spawn_blocking(move || {
        let status = format!("{}; {listening}", status());
        info!(%status, "ready");
        notify(&[sd_notify::NotifyState::Status(&status)]);
    });

    let idle = async {
        let Some(idle) = opts.idle_timeout else {
            return std::future::pending::<()>().await;
        };
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tick.tick().await;
            let now = Instant::now();
            let mut last = lock(&last_active);
            if graceful.count() > 0 || opts.busy.as_ref().is_some_and(|b| b()) {
                *last = now;
            } else if now.duration_since(*last) >= idle {
                info!(
                    idle_secs = idle.as_secs_f64(),
                    "idle: exiting until the next connection"
                );
                return;
            }
        }
    };
    tokio::select! {
        _ = idle => {}
        _ = shutdown_signal() => {}
    }
    notify(&[
        sd_notify::NotifyState::Stopping,
        sd_notify::NotifyState::Status("shutting down"),
    ]);
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    // A pull under way finishes and reports (bounded).
    if let Some(busy) = &opts.busy {
        let deadline = Instant::now() + BUSY_DRAIN;
        if busy() {
            info!("waiting for the pull under way before exiting");
        }
        while busy() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Let requests in flight finish, but not forever.
    if let Ok(g) = Arc::try_unwrap(graceful)
        && tokio::time::timeout(Duration::from_secs(30), g.shutdown())
            .await
            .is_err()
    {
        warn!("connections still open after 30 s; exiting anyway");
    }
    Ok(())
}

fn spawn_conn<I>(
    io: TokioIo<I>,
    peer: Peer,
    app: &Router,
    graceful: &hyper_util::server::graceful::GracefulShutdown,
    header_timeout: Duration,
    place: Option<Place>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let app = app.clone();
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(peer.clone());
        app.clone().oneshot(req.map(axum::body::Body::new))
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout)
        // Hyper's own error responses (unparsable request) get JSON bodies too.
        .serve_connection(TokioIo::new(JsonErrors::new(io.into_inner())), svc);
    let conn = graceful.watch(conn);
    tokio::spawn(async move {
        match tokio::time::timeout(CONNECTION_LIFETIME, conn).await {
            Ok(Err(e)) => tracing::debug!(error = %e, "connection ended with an error"),
            Ok(Ok(())) => {}
            Err(_) => tracing::debug!("connection closed: open for too long"),
        }
        drop(place);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_answer_is_well_formed_json() {
        let text = std::str::from_utf8(BUSY).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "));
        assert!(head.contains(&format!("content-length: {}\r\n", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert!(v["detail"].is_string());
    }

    #[test]
    fn caps_per_user_all_users_and_tcp() {
        let caps = Caps {
            per_user: 2,
            users: 3,
            tcp: 1,
        };
        let counts = Arc::new(Mutex::new(Counts::default()));
        let take = |w| Place::take(&counts, w, &caps);
        let a1 = take(Counted::User(1000)).unwrap();
        let _a2 = take(Counted::User(1000)).unwrap();
        assert!(take(Counted::User(1000)).is_none(), "one user's cap");
        let b1 = take(Counted::User(1001)).unwrap();
        assert!(take(Counted::User(1002)).is_none(), "all users' cap");
        let t = take(Counted::Tcp).unwrap();
        assert!(take(Counted::Tcp).is_none());
        assert!(
            take(Counted::TcpUser(1003)).is_none(),
            "known and unknown TCP callers share the total"
        );
        drop(a1);
        assert!(
            take(Counted::User(1002)).is_some(),
            "a place freed is reusable"
        );
        drop((b1, t));
        let _t = take(Counted::Tcp).unwrap();
        let c = lock(&counts);
        assert_eq!((c.unix.all, c.tcp.all), (1, 1));
        assert_eq!(c.unix.per_uid.get(&1000), Some(&1));
        assert!(
            !c.unix.per_uid.contains_key(&1001),
            "emptied users are forgotten"
        );
    }

    #[test]
    fn tcp_callers_are_capped_per_local_user() {
        let caps = Caps {
            per_user: 2,
            users: 100,
            tcp: 5,
        };
        let counts = Arc::new(Mutex::new(Counts::default()));
        let take = |w| Place::take(&counts, w, &caps);
        let held: Vec<Place> = (0..2)
            .map(|_| take(Counted::TcpUser(65534)).unwrap())
            .collect();
        assert!(take(Counted::TcpUser(65534)).is_none(), "one user's cap");
        let other = take(Counted::TcpUser(1000)).unwrap();
        let unknown = take(Counted::Tcp).unwrap();
        // The unix socket's caps are apart.
        let _u = take(Counted::User(65534)).unwrap();
        let _u2 = take(Counted::User(65534)).unwrap();
        let _t = take(Counted::TcpUser(1001)).unwrap();
        assert!(take(Counted::TcpUser(1002)).is_none(), "the total");
        assert!(take(Counted::Tcp).is_none(), "the total");
        drop(held);
        let _again = take(Counted::TcpUser(65534)).unwrap();
        drop((other, unknown));
        let c = lock(&counts);
        assert_eq!(c.tcp.all, 2);
        assert_eq!(
            c.tcp
                .per_uid
                .keys()
                .copied()
                .collect::<std::collections::BTreeSet<_>>(),
            [65534, 1001].into()
        );
    }
}
