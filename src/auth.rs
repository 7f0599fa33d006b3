//! Who may do what. On the unix socket the kernel's peer credentials decide: root and members
//! of group `kloigos` are admins, every other local user may only read (a unit's own user
//! included). Over TCP a bearer token decides; tokens are kept hashed (SHA-256) in a root-only
//! file, one per line: `NAME ROLE SHA256 CREATED`.

use serde::Serialize;
use sha2::{Digest, Sha256};
use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

pub(crate) const DEFAULT_TOKENS: &str = "/etc/kloigos/tokens";
const ADMIN_GROUP: &str = "kloigos";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A fleet host (its token lives in the inventory): only its own `/api/hosts/{name}/...`.
    Host,
    /// Reads only.
    Readonly,
    /// Reads, allocates, and deallocates the units it allocated.
    User,
    /// Everything.
    Admin,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Host => "host",
            Role::Readonly => "readonly",
            Role::User => "user",
            Role::Admin => "admin",
        })
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "readonly" => Ok(Role::Readonly),
            "user" => Ok(Role::User),
            "admin" => Ok(Role::Admin),
            _ => Err(format!("unknown role {s:?} (admin, user or readonly)")),
        }
    }
}

/// The authenticated caller of a request.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Caller {
    /// Stable name of the principal, recorded in the audit log and as a unit's owner:
    /// `token:NAME` or `unix:USER(uid N)`.
    pub(crate) actor: String,
    pub(crate) role: Role,
    /// A TCP caller without a token (`KLOIGOS_TCP_ANONYMOUS_ROLE`). All of them look alike, so
    /// none of them owns anything.
    #[serde(skip)]
    pub(crate) anonymous: bool,
    /// Who is refused, for rate-limiting the audit of refusals: `uid N` on the unix socket,
    /// `token:NAME` with a valid token, the address (without port) for other TCP callers.
    #[serde(skip)]
    pub(crate) source: String,
    /// The hostname a host token belongs to (role [`Role::Host`]).
    #[serde(skip)]
    pub(crate) host: Option<String>,
}

impl Caller {
    /// Whether this caller allocated a unit recorded as allocated by `allocated_by`.
    pub(crate) fn owns(&self, allocated_by: Option<&str>) -> bool {
        !self.anonymous && allocated_by == Some(self.actor.as_str())
    }
}

/// What the `Authorization` header of a request says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Credential {
    /// No header.
    None,
    /// `Bearer <token>`.
    Bearer(String),
    /// A header that is not one `Bearer <token>` in visible ASCII; the reason why.
    Malformed(&'static str),
}

/// Parses the `Authorization` header values of a request (every one of them: two headers are
/// malformed, not "the first one wins").
pub(crate) fn credential<'a>(mut values: impl Iterator<Item = &'a [u8]>) -> Credential {
    let Some(v) = values.next() else {
        return Credential::None;
    };
    if values.next().is_some() {
        return Credential::Malformed("more than one Authorization header");
    }
    let Some(v) = std::str::from_utf8(v).ok().filter(|v| {
        v.bytes()
            .all(|b| b.is_ascii_graphic() || b == b' ' || b == b'\t')
    }) else {
        return Credential::Malformed("the Authorization header is not visible ASCII");
    };
    let v = v.trim();
    let Some((scheme, token)) = v.split_once([' ', '\t']) else {
        return Credential::Malformed("expected Authorization: Bearer <token>");
    };
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Credential::Malformed("expected Authorization: Bearer <token>");
    }
    if token.is_empty() || token.contains([' ', '\t']) {
        return Credential::Malformed("expected Authorization: Bearer <token>");
    }
    Credential::Bearer(token.to_string())
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("token file {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("no randomness for a new token")]
    Random(#[source] getrandom::Error),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct TokenEntry {
    pub(crate) name: String,
    pub(crate) role: Role,
    #[serde(skip)]
    pub(crate) hash: String,
    pub(crate) created: String,
}

pub(crate) fn sha256_hex(s: &str) -> String {
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TokenError + '_ {
    move |source| TokenError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What says the token file is unchanged: device, inode, size, mtime and ctime (ns). Every
/// write (`kloigos token`'s rename, an editor's, an append) changes one of them.
type FileStamp = (u64, u64, i64, i64, i64, i64, i64);
/// The token file's entries as last parsed, with the metadata they were parsed at.
type Parsed = Option<(FileStamp, std::sync::Arc<[TokenEntry]>)>;

/// The token file. Checked on every request, so a revocation takes effect at once: its
/// metadata is looked at each time, and it is read and parsed again only when that changed.
#[derive(Debug, Clone)]
pub(crate) struct Tokens {
    pub(crate) path: PathBuf,
    parsed: std::sync::Arc<std::sync::Mutex<Parsed>>,
}

impl Tokens {
    pub(crate) fn new(path: impl Into<PathBuf>) -> Tokens {
        Tokens {
            path: path.into(),
            parsed: Default::default(),
        }
    }

    /// The entries, from the last parse while the file's metadata is unchanged.
    fn entries(&self) -> Result<std::sync::Arc<[TokenEntry]>, TokenError> {
        use std::os::unix::fs::MetadataExt;
        let m = match std::fs::metadata(&self.path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(std::sync::Arc::from(Vec::new()));
            }
            Err(e) => return Err(io_err(&self.path)(e)),
        };
        let stamp = (
            m.dev(),
            m.ino(),
            i64::try_from(m.size()).unwrap_or(i64::MAX),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec(),
        );
        // File times come from a coarse clock: two writes a few milliseconds apart may leave
        // the same times (and size). A file changed in the last two seconds is read again.
        let settled = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .is_ok_and(|now| i64::try_from(now.as_secs()).is_ok_and(|n| n - m.ctime() >= 2));
        let mut parsed = self.parsed.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, entries)) = parsed.as_ref()
            && *at == stamp
            && settled
        {
            return Ok(entries.clone());
        }
        let entries: std::sync::Arc<[TokenEntry]> = std::sync::Arc::from(self.list()?);
        *parsed = Some((stamp, entries.clone()));
        Ok(entries)
    }

    pub(crate) fn list(&self) -> Result<Vec<TokenEntry>, TokenError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&self.path)(e)),
        };
        let mut out = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let f: Vec<&str> = line.split_whitespace().collect();
            let bad = || {
                TokenError::Invalid(format!("{}:{}: malformed line", self.path.display(), n + 1))
            };
            let [name, role, hash, created] = f[..] else {
                return Err(bad());
            };
            out.push(TokenEntry {
                name: name.to_string(),
                role: role.parse().map_err(|_| bad())?,
                hash: hash.to_string(),
                created: created.to_string(),
            });
        }
        Ok(out)
    }

    fn save(&self, entries: &[TokenEntry]) -> Result<(), TokenError> {
        let mut text = String::from(
            "# Kloigos API tokens: NAME ROLE SHA256(token) CREATED. Managed by `kloigos token`.\n",
        );
        for e in entries {
            text.push_str(&format!("{} {} {} {}\n", e.name, e.role, e.hash, e.created));
        }
        let dir = self.path.parent().unwrap_or(Path::new("/"));
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let tmp = dir.join(format!(".tokens.{}", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            std::io::Write::write_all(&mut f, text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            io_err(&self.path)(e)
        })
    }

    /// Creates a token and returns its secret (shown once; only its hash is kept).
    pub(crate) fn create(&self, name: &str, role: Role) -> Result<String, TokenError> {
        let name_ok = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c));
        if !name_ok {
            return Err(TokenError::Invalid(format!(
                "token name {name:?}: 1 to 64 of letters, digits, '-', '_', '.', '@'"
            )));
        }
        let mut entries = self.list()?;
        if entries.iter().any(|e| e.name == name) {
            return Err(TokenError::Invalid(format!(
                "a token named {name:?} exists; revoke it first"
            )));
        }
        let mut raw = [0u8; 32];
        getrandom::fill(&mut raw).map_err(TokenError::Random)?;
        let secret = format!(
            "klg_{}",
            raw.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        entries.push(TokenEntry {
            name: name.to_string(),
            role,
            hash: sha256_hex(&secret),
            created: crate::time::now(),
        });
        self.save(&entries)?;
        Ok(secret)
    }

    /// Returns whether a token of that name existed.
    pub(crate) fn revoke(&self, name: &str) -> Result<bool, TokenError> {
        let mut entries = self.list()?;
        let before = entries.len();
        entries.retain(|e| e.name != name);
        if entries.len() == before {
            return Ok(false);
        }
        self.save(&entries)?;
        Ok(true)
    }

    /// The entry whose hash matches the presented secret.
    pub(crate) fn verify(&self, secret: &str) -> Result<Option<TokenEntry>, TokenError> {
        let h = sha256_hex(secret.trim());
        Ok(self.entries()?.iter().find(|e| e.hash == h).cloned())
    }
}

/// The prefix of a fleet host's token.
pub(crate) const HOST_TOKEN_PREFIX: &str = "kh_";

/// A new fleet host token: `kh_` and 43 base64url characters (32 random bytes). Only its
/// SHA-256 ([`sha256_hex`]) is stored, in the inventory.
pub(crate) fn new_host_token() -> Result<String, TokenError> {
    use base64::Engine;
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).map_err(TokenError::Random)?;
    Ok(format!(
        "{HOST_TOKEN_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    ))
}

/// The host part of a `Host` header or an origin's authority, lowercased: `name` of
/// `name:port`, `::1` of `[::1]:port`.
fn host_name(authority: &str) -> Option<String> {
    let a = authority.trim();
    let name = if let Some(rest) = a.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(is_port)) {
            return None;
        }
        inside
    } else {
        match a.rsplit_once(':') {
            Some((n, port)) if is_port(port) => n,
            Some(_) => return None,
            None => a,
        }
    };
    (!name.is_empty()).then(|| name.to_ascii_lowercase())
}

fn is_port(p: &str) -> bool {
    !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit())
}

/// Whether a TCP request's `Host` names this service: a loopback name (any port) or one of the
/// names the admin allowed (`KLOIGOS_ALLOWED_HOSTS`, any port). Anything else may be a DNS-rebinding page
/// in a browser.
pub(crate) fn host_allowed(host: Option<&str>, allowed: &[String]) -> bool {
    let Some(name) = host.and_then(host_name) else {
        return false;
    };
    ["localhost", "127.0.0.1", "::1"].contains(&name.as_str())
        || allowed
            .iter()
            .any(|a| host_name(a).is_some_and(|an| an == name))
}

/// Whether a browser's `Origin` may make changes: the page must come from this service itself
/// (same scheme-less authority as `Host`) or from a name the admin allowed.
pub(crate) fn origin_allowed(origin: &str, host: Option<&str>, allowed: &[String]) -> bool {
    let Some(authority) = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
    else {
        // `null` (sandboxed frames, file: pages) and anything else unexpected.
        return false;
    };
    if authority.contains(['/', '@', '?', '#']) {
        return false;
    }
    host.is_some_and(|h| h.trim().eq_ignore_ascii_case(authority))
        || host_name(authority)
            .is_some_and(|name| allowed.iter().any(|a| host_name(a) == Some(name.clone())))
}

/// The role a local user gets from its credentials: admin for root and group `kloigos`.
pub(crate) fn unix_caller(uid: u32, gid: u32) -> Caller {
    let user = nix::unistd::User::from_uid(uid.into()).ok().flatten();
    let name = user
        .as_ref()
        .map(|u| format!("{}(uid {uid})", u.name))
        .unwrap_or_else(|| format!("uid {uid}"));
    let admin_gid = nix::unistd::Group::from_name(ADMIN_GROUP)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw());
    let in_group = admin_gid.is_some_and(|ag| {
        gid == ag
            || user.as_ref().is_some_and(|u| {
                let cname = std::ffi::CString::new(u.name.clone()).unwrap_or_default();
                nix::unistd::getgrouplist(&cname, u.gid)
                    .map(|gs| gs.iter().any(|g| g.as_raw() == ag))
                    .unwrap_or(false)
            })
    });
    Caller {
        host: None,
        actor: format!("unix:{name}"),
        anonymous: false,
        source: format!("uid {uid}"),
        role: if uid == 0 || in_group {
            Role::Admin
        } else {
            Role::Readonly
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_edit_in_place_of_the_token_file_takes_effect_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tokens::new(dir.path().join("tokens"));
        let a = t.create("ops", Role::Admin).unwrap();
        // Settled (older than the coarse-clock window): kept parsed from here on.
        std::thread::sleep(std::time::Duration::from_millis(2100));
        assert_eq!(t.verify(&a).unwrap().unwrap().role, Role::Admin);
        assert_eq!(t.verify(&a).unwrap().unwrap().role, Role::Admin);
        // Same inode, same size: a role changed by an editor that writes in place.
        let text = std::fs::read_to_string(&t.path).unwrap();
        let edited = text.replace(" admin ", " user  ");
        assert_ne!(edited, text);
        std::fs::write(&t.path, &edited).unwrap();
        assert_eq!(t.verify(&a).unwrap().unwrap().role, Role::User);
        // Removed by hand: no token.
        std::fs::remove_file(&t.path).unwrap();
        assert!(t.verify(&a).unwrap().is_none());
    }

    #[test]
    fn tokens_are_hashed_verified_and_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tokens::new(dir.path().join("etc/tokens"));
        assert_eq!(t.list().unwrap(), vec![]);
        let a = t.create("ops", Role::Admin).unwrap();
        let u = t.create("ci-bot", Role::User).unwrap();
        assert!(a.starts_with("klg_") && a.len() == 68 && a != u);
        let text = std::fs::read_to_string(&t.path).unwrap();
        assert!(!text.contains(&a), "the secret is never stored");
        let mode = std::fs::metadata(&t.path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(t.verify(&a).unwrap().unwrap().role, Role::Admin);
        assert_eq!(t.verify(&u).unwrap().unwrap().name, "ci-bot");
        assert!(t.verify("klg_nope").unwrap().is_none());
        assert!(t.create("ops", Role::User).is_err(), "names are unique");
        assert!(t.create("bad name", Role::User).is_err());
        assert!(t.revoke("ops").unwrap());
        assert!(!t.revoke("ops").unwrap());
        assert!(t.verify(&a).unwrap().is_none());
        assert!(t.verify(&u).unwrap().is_some());
        std::fs::write(&t.path, "broken line\n").unwrap();
        assert!(t.list().is_err());
    }

    #[test]
    fn roles_order_and_root_is_admin() {
        assert!(Role::Admin > Role::User && Role::User > Role::Readonly);
        assert_eq!("user".parse::<Role>(), Ok(Role::User));
        assert!("root".parse::<Role>().is_err());
        assert_eq!(unix_caller(0, 0).role, Role::Admin);
        assert_eq!(unix_caller(65534, 65534).role, Role::Readonly);
        assert_eq!(unix_caller(65534, 65534).source, "uid 65534");
    }

    #[test]
    fn authorization_header_is_one_bearer_token_or_malformed() {
        let c = |vals: &[&[u8]]| credential(vals.iter().copied());
        assert_eq!(c(&[]), Credential::None);
        assert_eq!(c(&[b"Bearer klg_1"]), Credential::Bearer("klg_1".into()));
        assert_eq!(c(&[b"bearer   klg_1 "]), Credential::Bearer("klg_1".into()));
        for bad in [
            &b""[..],
            b"Bearer",
            b"Bearer ",
            b"Basic dXNlcjpwdw==",
            b"Bearer a b",
            b"Bearer klg_\xff\xfe",
            "Bearer klg_é".as_bytes(),
            b"Bearer klg_\x01",
            b"klg_1",
        ] {
            assert!(
                matches!(c(&[bad]), Credential::Malformed(_)),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(matches!(
            c(&[b"Bearer a", b"Bearer b"]),
            Credential::Malformed(_)
        ));
    }

    #[test]
    fn only_loopback_or_allowed_hosts() {
        // A port in an allowed name is ignored, as for loopback names.
        let allowed = vec![
            "kloigos.example.org".to_string(),
            "10.0.0.5:8000".to_string(),
        ];
        for ok in [
            "localhost",
            "localhost:8000",
            "LOCALHOST:1",
            "127.0.0.1:8000",
            "[::1]:8000",
            "[::1]",
            "kloigos.example.org",
            "kloigos.example.org:8000",
            "10.0.0.5:8000",
            "10.0.0.5:9000",
        ] {
            assert!(host_allowed(Some(ok), &allowed), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:8000",
            "localhost.evil.example",
            "127.0.0.2",
            "127.0.0.1:x",
            "localhost:80:80",
            "[::1]x",
            "",
            "::1",
        ] {
            assert!(!host_allowed(Some(bad), &allowed), "{bad}");
        }
        assert!(!host_allowed(None, &allowed), "no Host at all");
        assert!(!host_allowed(Some("evil.example"), &[]));
    }

    #[test]
    fn origins_must_be_this_service_or_allowed() {
        let allowed = vec!["dash.example.org".to_string()];
        let h = Some("127.0.0.1:8000");
        assert!(origin_allowed("http://127.0.0.1:8000", h, &allowed));
        assert!(origin_allowed("https://dash.example.org", h, &allowed));
        assert!(origin_allowed("http://dash.example.org:3000", h, &allowed));
        for bad in [
            "http://evil.example",
            "http://127.0.0.1:3000",
            "http://localhost:8000",
            "null",
            "",
            "file://",
            "http://127.0.0.1:8000/x",
            "http://user@127.0.0.1:8000",
            "ftp://127.0.0.1:8000",
        ] {
            assert!(!origin_allowed(bad, h, &allowed), "{bad}");
        }
        assert!(!origin_allowed("http://127.0.0.1:8000", None, &[]));
    }

    #[test]
    fn host_tokens_are_kh_and_43_base64url_chars_and_rank_lowest() {
        let a = new_host_token().unwrap();
        let b = new_host_token().unwrap();
        assert_ne!(a, b);
        let rest = a.strip_prefix(HOST_TOKEN_PREFIX).unwrap();
        assert_eq!(rest.len(), 43);
        assert!(
            rest.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        );
        assert!(Role::Host < Role::Readonly);
        assert_eq!(Role::Host.to_string(), "host");
        // Not a role a token file may grant.
        assert!("host".parse::<Role>().is_err());
    }

    #[test]
    fn anonymous_callers_own_nothing() {
        let named = Caller {
            actor: "token:ci".into(),
            role: Role::User,
            anonymous: false,
            source: "127.0.0.1".into(),
            host: None,
        };
        assert!(named.owns(Some("token:ci")));
        assert!(!named.owns(Some("token:other")) && !named.owns(None));
        let anon = Caller {
            actor: "anonymous(tcp 127.0.0.1)".into(),
            host: None,
            anonymous: true,
            ..named
        };
        assert!(!anon.owns(Some("anonymous(tcp 127.0.0.1)")));
    }
}
