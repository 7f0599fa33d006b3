//! A minimal D-Bus client for the few method calls Kloigos makes to logind on the system bus
//! (`SetUserLinger`, `TerminateUser`): one connection per call, `EXTERNAL` authentication,
//! `Hello`, the call, and its reply. This is what `loginctl` does for us, without starting a
//! process (a fork and exec of loginctl is most of the cost of lingering on or off).
//!
//! Only what these calls need is marshalled: the header fields, and bodies of `u` and `b`
//! values; replies are read to their header fields, and an error's first string.
//! Specification: <https://dbus.freedesktop.org/doc/dbus-specification.html>.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// The system bus, unless `DBUS_SYSTEM_BUS_ADDRESS` names another `unix:path=`.
const SYSTEM_BUS: &str = "/run/dbus/system_bus_socket";
/// How long a call may take: D-Bus's own default reply timeout.
const TIMEOUT: Duration = Duration::from_secs(25);
/// Largest message accepted (the specification's limit is 128 MiB; ours are tiny).
const MAX_MESSAGE: usize = 1 << 20;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum DbusError {
    /// The bus could not be reached or spoke something else: the caller may fall back.
    #[error("D-Bus: {0}")]
    Transport(String),
    /// The bus or the service answered with an error.
    #[error("{name}: {message}")]
    Reply { name: String, message: String },
}

impl From<io::Error> for DbusError {
    fn from(e: io::Error) -> Self {
        DbusError::Transport(e.to_string())
    }
}

/// An argument of a call.
#[derive(Debug, Clone, PartialEq)]
pub enum Arg {
    U32(u32),
    Bool(bool),
}

impl Arg {
    fn code(&self) -> char {
        match self {
            Arg::U32(_) => 'u',
            Arg::Bool(_) => 'b',
        }
    }
}

/// A method call.
#[derive(Debug, Clone)]
pub struct Call<'a> {
    pub destination: &'a str,
    pub path: &'a str,
    pub interface: &'a str,
    pub member: &'a str,
    pub args: &'a [Arg],
}

/// logind's `Manager` method `member` with `args`.
pub fn logind<'a>(member: &'a str, args: &'a [Arg]) -> Call<'a> {
    Call {
        destination: "org.freedesktop.login1",
        path: "/org/freedesktop/login1",
        interface: "org.freedesktop.login1.Manager",
        member,
        args,
    }
}

/// Little-endian marshalling with the specification's alignment (relative to the message's start).
#[derive(Default)]
struct Buf(Vec<u8>);

impl Buf {
    fn pad(&mut self, to: usize) {
        while self.0.len() % to != 0 {
            self.0.push(0);
        }
    }
    fn u32(&mut self, v: u32) {
        self.pad(4);
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn str(&mut self, s: &str) {
        self.u32(u32::try_from(s.len()).unwrap_or(u32::MAX));
        self.0.extend_from_slice(s.as_bytes());
        self.0.push(0);
    }
    fn sig(&mut self, s: &str) {
        self.0.push(u8::try_from(s.len()).unwrap_or(u8::MAX));
        self.0.extend_from_slice(s.as_bytes());
        self.0.push(0);
    }
    /// A header field: struct (code, variant of `sig`).
    fn field(&mut self, code: u8, sig: &str, write: impl FnOnce(&mut Buf)) {
        self.pad(8);
        self.0.push(code);
        self.sig(sig);
        write(self);
    }
}

/// The bytes of a method call with `serial`.
fn method_call(c: &Call<'_>, serial: u32) -> Vec<u8> {
    let signature: String = c.args.iter().map(Arg::code).collect();
    // The body first (it starts 8-aligned, so aligning within it is aligning in the message).
    let mut body = Buf::default();
    for a in c.args {
        match a {
            Arg::U32(v) => body.u32(*v),
            Arg::Bool(v) => body.u32(u32::from(*v)),
        }
    }
    let mut m = Buf::default();
    m.0.extend_from_slice(&[b'l', 1, 0, 1]);
    m.u32(u32::try_from(body.0.len()).unwrap_or(u32::MAX));
    m.u32(serial);
    m.u32(0); // the fields' length, set below
    let start = m.0.len();
    m.field(1, "o", |b| b.str(c.path));
    m.field(2, "s", |b| b.str(c.interface));
    m.field(3, "s", |b| b.str(c.member));
    m.field(6, "s", |b| b.str(c.destination));
    if !signature.is_empty() {
        m.field(8, "g", |b| b.sig(&signature));
    }
    let len = u32::try_from(m.0.len() - start).unwrap_or(u32::MAX);
    m.0[12..16].copy_from_slice(&len.to_le_bytes());
    m.pad(8);
    m.0.extend_from_slice(&body.0);
    m.0
}

/// A reply's parts that matter here.
#[derive(Debug, PartialEq)]
struct Reply {
    kind: u8,
    reply_serial: Option<u32>,
    error_name: Option<String>,
    /// The first string of the body, when its signature starts with `s`.
    first_string: Option<String>,
}

/// Reads values of a received message (either byte order).
struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
    big: bool,
}

impl Cursor<'_> {
    fn bad() -> DbusError {
        DbusError::Transport("malformed message from the bus".into())
    }
    fn align(&mut self, to: usize) -> Result<(), DbusError> {
        self.at = self.at.div_ceil(to) * to;
        if self.at > self.b.len() {
            return Err(Self::bad());
        }
        Ok(())
    }
    fn take(&mut self, n: usize) -> Result<&[u8], DbusError> {
        let end = self.at.checked_add(n).ok_or_else(Self::bad)?;
        let s = self.b.get(self.at..end).ok_or_else(Self::bad)?;
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, DbusError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, DbusError> {
        self.align(4)?;
        let s: [u8; 4] = self.take(4)?.try_into().map_err(|_| Self::bad())?;
        Ok(if self.big {
            u32::from_be_bytes(s)
        } else {
            u32::from_le_bytes(s)
        })
    }
    fn str(&mut self) -> Result<String, DbusError> {
        let n = usize::try_from(self.u32()?).map_err(|_| Self::bad())?;
        let s = String::from_utf8_lossy(self.take(n)?).into_owned();
        self.take(1)?;
        Ok(s)
    }
    fn sig(&mut self) -> Result<String, DbusError> {
        let n = usize::from(self.u8()?);
        let s = String::from_utf8_lossy(self.take(n)?).into_owned();
        self.take(1)?;
        Ok(s)
    }
}

/// Parses a whole message (as [`read_message`] returns it).
fn parse_reply(b: &[u8]) -> Result<Reply, DbusError> {
    let big = match b.first() {
        Some(b'l') => false,
        Some(b'B') => true,
        _ => return Err(Cursor::bad()),
    };
    let mut c = Cursor { b, at: 1, big };
    let kind = c.u8()?;
    c.at = 4;
    let body_len = usize::try_from(c.u32()?).map_err(|_| Cursor::bad())?;
    let _serial = c.u32()?;
    let fields_len = usize::try_from(c.u32()?).map_err(|_| Cursor::bad())?;
    let fields_end = 16usize.checked_add(fields_len).ok_or_else(Cursor::bad)?;
    let (mut reply_serial, mut error_name, mut signature) = (None, None, String::new());
    while c.at < fields_end {
        c.align(8)?;
        if c.at >= fields_end {
            break;
        }
        let code = c.u8()?;
        let sig = c.sig()?;
        match sig.as_str() {
            "s" | "o" => {
                let v = c.str()?;
                if code == 4 {
                    error_name = Some(v);
                }
            }
            "g" => {
                let v = c.sig()?;
                if code == 8 {
                    signature = v;
                }
            }
            "u" => {
                let v = c.u32()?;
                if code == 5 {
                    reply_serial = Some(v);
                }
            }
            // No other type is defined for header fields; an unknown one cannot be skipped.
            _ => return Err(Cursor::bad()),
        }
    }
    c.at = fields_end;
    c.align(8)?;
    let body_start = c.at;
    if b.len() < body_start.saturating_add(body_len) {
        return Err(Cursor::bad());
    }
    let first_string = if signature.starts_with('s') {
        let mut body = Cursor {
            b: &b[body_start..body_start + body_len],
            at: 0,
            big,
        };
        body.str().ok()
    } else {
        None
    };
    Ok(Reply {
        kind,
        reply_serial,
        error_name,
        first_string,
    })
}

/// Reads one whole message.
fn read_message(s: &mut impl Read) -> Result<Vec<u8>, DbusError> {
    let mut head = [0u8; 16];
    s.read_exact(&mut head)?;
    let big = head[0] == b'B';
    let word = |i: usize| {
        let w: [u8; 4] = [head[i], head[i + 1], head[i + 2], head[i + 3]];
        usize::try_from(if big {
            u32::from_be_bytes(w)
        } else {
            u32::from_le_bytes(w)
        })
        .unwrap_or(usize::MAX)
    };
    let (body_len, fields_len) = (word(4), word(12));
    let total = 16usize
        .saturating_add(fields_len)
        .div_ceil(8)
        .saturating_mul(8)
        .saturating_add(body_len);
    if total > MAX_MESSAGE {
        return Err(DbusError::Transport(format!(
            "a message of {total} bytes from the bus"
        )));
    }
    let mut m = head.to_vec();
    m.resize(total, 0);
    s.read_exact(&mut m[16..])?;
    Ok(m)
}

/// The bus's address: a `unix:path=` address of `DBUS_SYSTEM_BUS_ADDRESS`, or the default.
fn system_bus_path() -> String {
    std::env::var("DBUS_SYSTEM_BUS_ADDRESS")
        .ok()
        .and_then(|a| {
            a.split(';').find_map(|one| {
                let rest = one.strip_prefix("unix:")?;
                rest.split(',')
                    .find_map(|kv| kv.strip_prefix("path="))
                    .map(str::to_string)
            })
        })
        .unwrap_or_else(|| SYSTEM_BUS.to_string())
}

/// Calls `c` on the system bus and waits for its reply.
pub fn call_system(c: &Call<'_>) -> Result<(), DbusError> {
    call_at(&system_bus_path(), c)
}

/// Calls `c` on the bus listening at `socket` and waits for its reply: `Ok` for a method
/// return, [`DbusError::Reply`] for an error.
pub fn call_at(socket: &str, c: &Call<'_>) -> Result<(), DbusError> {
    let mut s = UnixStream::connect(socket)
        .map_err(|e| DbusError::Transport(format!("cannot connect to {socket}: {e}")))?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    // EXTERNAL: the bus knows our uid from the socket; we name it in hex of its decimal text.
    let uid = nix::unistd::geteuid().as_raw().to_string();
    let hex: String = uid.bytes().map(|b| format!("{b:02x}")).collect();
    s.write_all(format!("\0AUTH EXTERNAL {hex}\r\n").as_bytes())?;
    let line = read_line(&mut s)?;
    if !line.starts_with("OK ") {
        return Err(DbusError::Transport(format!(
            "authentication refused: {line:?}"
        )));
    }
    s.write_all(b"BEGIN\r\n")?;
    let hello = Call {
        destination: "org.freedesktop.DBus",
        path: "/org/freedesktop/DBus",
        interface: "org.freedesktop.DBus",
        member: "Hello",
        args: &[],
    };
    // Both at once: the bus answers them in order.
    let mut out = method_call(&hello, 1);
    out.extend_from_slice(&method_call(c, 2));
    s.write_all(&out)?;
    for _ in 0..64 {
        let m = read_message(&mut s)?;
        let r = parse_reply(&m)?;
        match (r.kind, r.reply_serial) {
            (2, Some(2)) => return Ok(()),
            (3, Some(serial)) => {
                return Err(DbusError::Reply {
                    name: r.error_name.unwrap_or_else(|| "error".into()),
                    message: format!(
                        "{}{}",
                        r.first_string.unwrap_or_default(),
                        if serial == 1 { " (Hello)" } else { "" }
                    ),
                });
            }
            // Hello's reply, NameAcquired and other signals.
            _ => {}
        }
    }
    Err(DbusError::Transport(
        "no reply among the bus's first 64 messages".into(),
    ))
}

/// Reads one `\r\n`-ended line of the authentication exchange.
fn read_line(s: &mut UnixStream) -> Result<String, DbusError> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while !line.ends_with(b"\r\n") {
        if line.len() > 512 {
            return Err(DbusError::Transport("authentication line too long".into()));
        }
        s.read_exact(&mut b)?;
        line.push(b[0]);
    }
    line.truncate(line.len() - 2);
    Ok(String::from_utf8_lossy(&line).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_is_marshalled_as_the_specification_says() {
        let args = [Arg::U32(20001), Arg::Bool(true), Arg::Bool(false)];
        let m = method_call(&logind("SetUserLinger", &args), 7);
        // Fixed header: little endian, method call, no flags, version 1, body 12 bytes, serial 7.
        assert_eq!(&m[..12], &[b'l', 1, 0, 1, 12, 0, 0, 0, 7, 0, 0, 0]);
        let fields_len = u32::from_le_bytes(m[12..16].try_into().unwrap()) as usize;
        let body_at = (16 + fields_len).div_ceil(8) * 8;
        assert_eq!(m.len(), body_at + 12);
        assert_eq!(
            &m[body_at..],
            &[0x21, 0x4e, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0],
            "u 20001, b true, b false"
        );
        // The first field: PATH, variant of signature "o", the path (length, bytes, NUL).
        assert_eq!(&m[16..20], &[1, 1, b'o', 0]);
        assert_eq!(u32::from_le_bytes(m[20..24].try_into().unwrap()), 23);
        assert_eq!(&m[24..48], b"/org/freedesktop/login1\0");
        // Read back by our own reader, as a call: no reply serial, no error.
        let r = parse_reply(&m).unwrap();
        assert_eq!(
            r,
            Reply {
                kind: 1,
                reply_serial: None,
                error_name: None,
                first_string: None
            }
        );
        let text = String::from_utf8_lossy(&m);
        for s in [
            "org.freedesktop.login1.Manager",
            "SetUserLinger",
            "org.freedesktop.login1",
            "ubb",
        ] {
            assert!(text.contains(s), "{s}");
        }
    }

    /// An error reply as dbus-daemon sends it: big-endian too.
    fn error_reply(big: bool) -> Vec<u8> {
        let w = |v: u32| {
            if big {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            }
        };
        let name = "org.freedesktop.DBus.Error.AccessDenied";
        let msg = "no";
        let mut body = w(msg.len() as u32).to_vec();
        body.extend_from_slice(msg.as_bytes());
        body.push(0);
        let mut f = Vec::new();
        // ERROR_NAME
        f.extend_from_slice(&[4, 1, b's', 0]);
        f.extend_from_slice(&w(name.len() as u32));
        f.extend_from_slice(name.as_bytes());
        f.push(0);
        while (16 + f.len()) % 8 != 0 {
            f.push(0);
        }
        // REPLY_SERIAL
        f.extend_from_slice(&[5, 1, b'u', 0]);
        f.extend_from_slice(&w(2));
        while (16 + f.len()) % 8 != 0 {
            f.push(0);
        }
        // SIGNATURE
        f.extend_from_slice(&[8, 1, b'g', 0, 1, b's', 0]);
        let mut m = vec![if big { b'B' } else { b'l' }, 3, 1, 1];
        m.extend_from_slice(&w(body.len() as u32));
        m.extend_from_slice(&w(9));
        m.extend_from_slice(&w(f.len() as u32));
        m.extend_from_slice(&f);
        while m.len() % 8 != 0 {
            m.push(0);
        }
        m.extend_from_slice(&body);
        m
    }

    #[test]
    fn error_replies_are_read_in_either_byte_order() {
        for big in [false, true] {
            let m = error_reply(big);
            let read = read_message(&mut &m[..]).unwrap();
            assert_eq!(read, m);
            let r = parse_reply(&read).unwrap();
            assert_eq!(r.kind, 3);
            assert_eq!(r.reply_serial, Some(2));
            assert_eq!(
                r.error_name.as_deref(),
                Some("org.freedesktop.DBus.Error.AccessDenied")
            );
            assert_eq!(r.first_string.as_deref(), Some("no"));
        }
    }

    #[test]
    fn truncated_or_hostile_messages_are_errors_not_panics() {
        let m = error_reply(false);
        for n in 0..m.len() {
            assert!(read_message(&mut &m[..n]).is_err(), "cut at {n}");
            let _ = parse_reply(&m[..n]);
        }
        // Every single-byte corruption parses or fails, never panics.
        for i in 0..m.len() {
            for v in [0u8, 0xff, 0x7f] {
                let mut bad = m.clone();
                bad[i] = v;
                let _ = parse_reply(&bad);
                let _ = read_message(&mut &bad[..]);
            }
        }
        // A length claiming gigabytes is refused before anything is allocated.
        let mut huge = m.clone();
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            read_message(&mut &huge[..]),
            Err(DbusError::Transport(_))
        ));
    }

    /// Against a real dbus-daemon (a private bus in a temporary directory), where one is
    /// installed: `GetId` succeeds, an unknown method is an error reply with the bus's
    /// message, and a missing socket is a transport error.
    #[test]
    fn calls_against_a_real_dbus_daemon() {
        if std::process::Command::new("dbus-daemon")
            .arg("--version")
            .output()
            .is_err()
        {
            if std::env::var_os("KLOIGOS_REQUIRE_PRIVILEGED").is_some() {
                panic!("dbus-daemon is not installed (KLOIGOS_REQUIRE_PRIVILEGED is set)");
            }
            eprintln!("skipped: no dbus-daemon");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("bus");
        let conf = dir.path().join("bus.conf");
        std::fs::write(
            &conf,
            format!(
                "<!DOCTYPE busconfig PUBLIC \"-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN\" \
                 \"http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd\">\
                 <busconfig><type>session</type><listen>unix:path={}</listen>\
                 <auth>EXTERNAL</auth>\
                 <policy context=\"default\"><allow send_destination=\"*\" eavesdrop=\"true\"/>\
                 <allow eavesdrop=\"true\"/><allow receive_sender=\"*\"/><allow own=\"*\"/>\
                 </policy></busconfig>",
                sock.display()
            ),
        )
        .unwrap();
        let mut daemon = std::process::Command::new("dbus-daemon")
            .arg(format!("--config-file={}", conf.display()))
            .arg("--nofork")
            .arg("--nopidfile")
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        for _ in 0..200 {
            if sock.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let path = sock.to_string_lossy().into_owned();
        let bus = |member, args| Call {
            destination: "org.freedesktop.DBus",
            path: "/org/freedesktop/DBus",
            interface: "org.freedesktop.DBus",
            member,
            args,
        };
        let ok = call_at(&path, &bus("GetId", &[]));
        let missing = call_at(&path, &bus("NoSuchMethod", &[Arg::U32(7), Arg::Bool(true)]));
        let _ = daemon.kill();
        let _ = daemon.wait();
        ok.unwrap();
        match missing {
            Err(DbusError::Reply { name, message }) => {
                assert_eq!(name, "org.freedesktop.DBus.Error.UnknownMethod");
                assert!(message.contains("NoSuchMethod"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            call_at(&path, &bus("Hello", &[])),
            Err(DbusError::Transport(_))
        ));
    }
}
