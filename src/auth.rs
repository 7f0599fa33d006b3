//! Who may do what. On the unix socket the kernel's peer credentials decide: root and members
//! of group `kloigos` are admins, every other local user may only read (a unit's own user
//! included). Over TCP a bearer token decides; tokens are kept hashed (SHA-256) in a root-only
//! file, one per line: `NAME ROLE SHA256 CREATED`.

use serde::Serialize;
use sha2::{Digest, Sha256};
use std::fmt;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

pub const DEFAULT_TOKENS: &str = "/etc/kloigos/tokens";
const ADMIN_GROUP: &str = "kloigos";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
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
pub struct Caller {
    /// Stable name of the principal, recorded in the audit log and as a unit's owner:
    /// `token:NAME` or `unix:USER(uid N)`.
    pub actor: String,
    pub role: Role,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenEntry {
    pub name: String,
    pub role: Role,
    #[serde(skip)]
    pub hash: String,
    pub created: String,
}

fn sha256_hex(s: &str) -> String {
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

/// The token file. Read on every check, so a revocation takes effect at once.
#[derive(Debug, Clone)]
pub struct Tokens {
    pub path: PathBuf,
}

impl Tokens {
    pub fn new(path: impl Into<PathBuf>) -> Tokens {
        Tokens { path: path.into() }
    }

    pub fn list(&self) -> Result<Vec<TokenEntry>, TokenError> {
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
    pub fn create(&self, name: &str, role: Role) -> Result<String, TokenError> {
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
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut raw))
            .map_err(io_err(Path::new("/dev/urandom")))?;
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
    pub fn revoke(&self, name: &str) -> Result<bool, TokenError> {
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
    pub fn verify(&self, secret: &str) -> Result<Option<TokenEntry>, TokenError> {
        let h = sha256_hex(secret.trim());
        Ok(self.list()?.into_iter().find(|e| e.hash == h))
    }
}

/// The role a local user gets from its credentials: admin for root and group `kloigos`.
pub fn unix_caller(uid: u32, gid: u32) -> Caller {
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
        actor: format!("unix:{name}"),
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
    }
}
