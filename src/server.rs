//! Listeners and the serving loop: sockets handed over by systemd (`LISTEN_FDS`) or bound with
//! `--listen`, HTTP/1 with hyper, the caller's identity attached to each request, readiness and
//! status reported with sd-notify, and an exit after a quiet period so socket activation can
//! start the service again on the next connection.

use crate::api::Peer;
use crate::canned::JsonErrors;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::io;
use std::os::unix::fs::PermissionsExt;
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
    pub fn describe(&self) -> String {
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
pub fn bind(addr: &str) -> io::Result<Listener> {
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
        // Anyone may connect; peer credentials decide what they may do.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))?;
        Ok(Listener::Unix(l, Some(path)))
    } else {
        let l = std::net::TcpListener::bind(addr)?;
        Ok(Listener::Tcp(l))
    }
}

pub struct ServeOptions {
    /// Exit after this long with no open connection (None: serve until a signal).
    pub idle_timeout: Option<Duration>,
    /// Sent as `STATUS=` once ready.
    pub status: String,
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
pub async fn serve(listeners: Vec<Listener>, app: Router, opts: ServeOptions) -> io::Result<()> {
    let graceful = Arc::new(hyper_util::server::graceful::GracefulShutdown::new());
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
        match l {
            Listener::Tcp(l) => {
                l.set_nonblocking(true)?;
                let l = tokio::net::TcpListener::from_std(l)?;
                tasks.spawn(async move {
                    loop {
                        tokio::select! {
                            r = l.accept() => match r {
                                Ok((s, addr)) => {
                                    *last_active.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
                                    let _ = s.set_nodelay(true);
                                    spawn_conn(TokioIo::new(s), Peer::Tcp(addr), &app, &graceful);
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
                                    *last_active.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
                                    let peer = match s.peer_cred() {
                                        Ok(c) => Peer::Unix { uid: c.uid(), gid: c.gid(), pid: c.pid() },
                                        Err(_) => Peer::Unknown,
                                    };
                                    spawn_conn(TokioIo::new(s), peer, &app, &graceful);
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
    let status = format!("{}; listening on {}", opts.status, described.join(", "));
    info!(%status, "ready");
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&status),
    ]);

    let idle = async {
        let Some(idle) = opts.idle_timeout else {
            return std::future::pending::<()>().await;
        };
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tick.tick().await;
            let now = Instant::now();
            let mut last = last_active.lock().unwrap_or_else(|p| p.into_inner());
            if graceful.count() > 0 {
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
        .header_read_timeout(Duration::from_secs(30))
        // Hyper's own error responses (unparsable request) get JSON bodies too.
        .serve_connection(TokioIo::new(JsonErrors::new(io.into_inner())), svc);
    let conn = graceful.watch(conn);
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "connection ended with an error");
        }
    });
}
