//! Validation of every value that can reach a rendered system file or the database.
//! Each function returns a human-readable reason on failure (it becomes an HTTP 422 `msg`).
//!
//! Reasons start with the validator's name (`hostname: ...`, `ssh_public_key: ...`), and quote
//! user input shortened and escaped, so a reason is always one printable line.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

/// Quotes user input for a reason: escaped (no raw control characters) and at most 40 chars.
fn shown(s: &str) -> String {
    const MAX: usize = 40;
    let mut out: String = s.chars().take(MAX).flat_map(char::escape_debug).collect();
    if s.chars().nth(MAX).is_some() {
        out.push('…');
    }
    out
}

/// RFC 1123 host name: 1..=253 chars, dot-separated labels of 1..=63 chars of `[a-z0-9-]`,
/// not starting or ending with `-`. Lowercase only (compute ids are case-sensitive). No `_`.
pub(crate) fn hostname(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("hostname: must not be empty".into());
    }
    // Characters first: after this check, bytes and characters count the same.
    if let Some(c) = s
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '-' | '.'))
    {
        return Err(format!(
            "hostname: character '{}' is not allowed (only lowercase letters, digits, '-' and '.')",
            c.escape_debug()
        ));
    }
    if s.len() > 253 {
        return Err(format!(
            "hostname: {} characters, at most 253 are allowed",
            s.len()
        ));
    }
    for label in s.split('.') {
        if label.is_empty() {
            return Err(format!(
                "hostname: '{}' has an empty label (leading, trailing or doubled '.')",
                shown(s)
            ));
        }
        if label.len() > 63 {
            return Err(format!(
                "hostname: label '{}' is longer than 63 characters",
                shown(label)
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!(
                "hostname: label '{}' must not start or end with '-'",
                shown(label)
            ));
        }
    }
    Ok(())
}

/// Region or zone: 1..=64 chars of `[A-Za-z0-9._-]`, starting with a letter or digit.
pub(crate) fn label(s: &str) -> Result<(), String> {
    let Some(first) = s.chars().next() else {
        return Err("label: must not be empty".into());
    };
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "label: character '{}' is not allowed (only letters, digits, '.', '_' and '-')",
            c.escape_debug()
        ));
    }
    if s.len() > 64 {
        return Err(format!(
            "label: {} characters, at most 64 are allowed",
            s.len()
        ));
    }
    if !first.is_ascii_alphanumeric() {
        return Err(format!(
            "label: '{}' must start with a letter or digit",
            shown(s)
        ));
    }
    Ok(())
}

/// An OpenSSH public key line as `authorized_keys` takes it, with no options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshKey {
    pub(crate) kind: String,
    pub(crate) blob: String,
    pub(crate) comment: Option<String>,
}

impl SshKey {
    /// `kind blob[ comment]`, one line without trailing newline.
    pub(crate) fn to_line(&self) -> String {
        match &self.comment {
            Some(comment) => format!("{} {} {}", self.kind, self.blob, comment),
            None => format!("{} {}", self.kind, self.blob),
        }
    }
}

const KEY_TYPES: [&str; 7] = [
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];
const MAX_LINE: usize = 16 * 1024;
const MAX_COMMENT: usize = 256;
const MIN_RSA_BITS: u32 = 2048;

/// Reads the SSH wire format (RFC 4251): u32 big-endian length, then that many bytes.
struct Wire<'a>(&'a [u8]);

impl<'a> Wire<'a> {
    fn string(&mut self) -> Option<&'a [u8]> {
        let (len, rest) = self.0.split_first_chunk::<4>()?;
        let len = usize::try_from(u32::from_be_bytes(*len)).ok()?;
        if rest.len() < len {
            return None;
        }
        let (field, rest) = rest.split_at(len);
        self.0 = rest;
        Some(field)
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Checks the decoded blob holds exactly a public key of `kind`, field by field, as OpenSSH
/// would read it (it rejects trailing data too).
fn check_blob(kind: &str, blob: &[u8]) -> Result<(), String> {
    let mut wire = Wire(blob);
    let malformed = || format!("ssh_public_key: malformed {kind} key data");
    let Some(first) = wire.string() else {
        return Err("ssh_public_key: key data is not an SSH public key".into());
    };
    if first != kind.as_bytes() {
        return Err(format!(
            "ssh_public_key: key data is of type '{}', not '{kind}'",
            shown(&String::from_utf8_lossy(first))
        ));
    }
    match kind {
        "ssh-ed25519" | "sk-ssh-ed25519@openssh.com" => {
            if wire.string().map(<[u8]>::len) != Some(32) {
                return Err(malformed());
            }
        }
        "ssh-rsa" => {
            let (Some(e), Some(n)) = (wire.string(), wire.string()) else {
                return Err(malformed());
            };
            // mpints are two's complement: a set top bit would make them negative.
            if e.is_empty() || n.is_empty() || e[0] & 0x80 != 0 || n[0] & 0x80 != 0 {
                return Err(malformed());
            }
            let bits = mpint_bits(n);
            if bits < MIN_RSA_BITS {
                return Err(format!(
                    "ssh_public_key: RSA key of {bits} bits is too weak, at least {MIN_RSA_BITS} are required"
                ));
            }
        }
        _ => {
            // ECDSA: curve name, then an uncompressed point 0x04 || x || y.
            let curve = kind
                .trim_start_matches("sk-")
                .trim_start_matches("ecdsa-sha2-")
                .trim_end_matches("@openssh.com");
            let point_len = match curve {
                "nistp256" => 65,
                "nistp384" => 97,
                _ => 133,
            };
            let name_ok = wire.string() == Some(curve.as_bytes());
            let point_ok = wire
                .string()
                .is_some_and(|q| q.len() == point_len && q[0] == 0x04);
            if !(name_ok && point_ok) {
                return Err(malformed());
            }
        }
    }
    // Security keys end with the FIDO application string (usually "ssh:").
    if kind.starts_with("sk-") && wire.string().is_none() {
        return Err(malformed());
    }
    if !wire.is_empty() {
        return Err(format!(
            "ssh_public_key: unexpected data after the {kind} key"
        ));
    }
    Ok(())
}

/// Significant bits of a non-negative big-endian integer.
fn mpint_bits(n: &[u8]) -> u32 {
    let digits: Vec<u8> = n.iter().copied().skip_while(|&b| b == 0).collect();
    match digits.first() {
        None => 0,
        Some(&top) => {
            let bytes = u32::try_from(digits.len()).unwrap_or(u32::MAX / 8);
            (bytes - 1) * 8 + (8 - top.leading_zeros())
        }
    }
}

/// Whether `kind blob` is itself a valid key: used to spot a second key in the comment.
fn is_key(kind: &str, blob: &str) -> bool {
    KEY_TYPES.contains(&kind)
        && STANDARD
            .decode(blob)
            .is_ok_and(|bytes| check_blob(kind, &bytes).is_ok())
}

/// Known types: ssh-ed25519, ssh-rsa, ecdsa-sha2-nistp256/384/521, sk-ssh-ed25519@openssh.com,
/// sk-ecdsa-sha2-nistp256@openssh.com. Accepts surrounding whitespace and one trailing newline;
/// rejects: several lines/keys, options before the type, unknown type, blob that is not base64 or whose
/// decoded first field (u32 length + string) is not the same type, ssh-rsa blob shorter than a 2048-bit key
/// would give (reject < 2048 bits is optional), control characters anywhere, comment over 256 chars, whole line over 16 KiB.
///
/// Beyond the first field, the blob is checked field by field (key sizes, curve name, no trailing
/// data), and RSA moduli below 2048 bits are rejected. Fields may be separated by several spaces;
/// `to_line` writes them with one.
pub fn ssh_public_key(s: &str) -> Result<SshKey, String> {
    let line = s.trim();
    if line.is_empty() {
        return Err("ssh_public_key: must not be empty".into());
    }
    if line.len() > MAX_LINE {
        return Err(format!(
            "ssh_public_key: {} bytes, at most 16 KiB are allowed",
            line.len()
        ));
    }
    if line.contains(['\n', '\r']) {
        return Err("ssh_public_key: must be exactly one key on one line".into());
    }
    if line.chars().any(char::is_control) {
        return Err("ssh_public_key: control characters (tab, NUL, ...) are not allowed".into());
    }

    let (kind, rest) = line.split_once(' ').unwrap_or((line, ""));
    if !KEY_TYPES.contains(&kind) {
        // authorized_keys options (`command="..."`, `restrict`, ...) come before the type.
        if line
            .split(' ')
            .skip(1)
            .any(|word| KEY_TYPES.contains(&word))
        {
            return Err("ssh_public_key: options before the key type are not allowed".into());
        }
        return Err(format!(
            "ssh_public_key: unknown key type '{}'",
            shown(kind)
        ));
    }
    let rest = rest.trim_start_matches(' ');
    let (blob, comment) = rest.split_once(' ').unwrap_or((rest, ""));
    if blob.is_empty() {
        return Err(format!("ssh_public_key: missing key data after '{kind}'"));
    }
    let bytes = STANDARD
        .decode(blob)
        .map_err(|_| "ssh_public_key: key data is not valid base64".to_string())?;
    check_blob(kind, &bytes)?;

    let comment = comment.trim_start_matches(' ');
    let words: Vec<&str> = comment.split(' ').filter(|w| !w.is_empty()).collect();
    if words.windows(2).any(|w| is_key(w[0], w[1])) {
        return Err("ssh_public_key: must be exactly one key on one line".into());
    }
    if comment.chars().count() > MAX_COMMENT {
        return Err(format!(
            "ssh_public_key: comment is longer than {MAX_COMMENT} characters"
        ));
    }
    Ok(SshKey {
        kind: kind.to_string(),
        blob: blob.to_string(),
        comment: (!comment.is_empty()).then(|| comment.to_string()),
    })
}

/// Tag key: 1..=64 chars of `[A-Za-z0-9._:/-]`.
pub(crate) fn tag_key(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("tag_key: must not be empty".into());
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '/' | '-')))
    {
        return Err(format!(
            "tag_key: character '{}' is not allowed (only letters, digits, '.', '_', ':', '/' and '-')",
            c.escape_debug()
        ));
    }
    if s.len() > 64 {
        return Err(format!(
            "tag_key: {} characters, at most 64 are allowed",
            s.len()
        ));
    }
    Ok(())
}

/// A string that is stored and shown but never rendered into a system file: at most `max` chars,
/// no control characters (no newline, tab, NUL, DEL, C1).
///
/// `max` counts characters (Unicode scalar values), not bytes.
pub(crate) fn free_text(s: &str, max: usize) -> Result<(), String> {
    let count = s.chars().count();
    if count > max {
        return Err(format!(
            "free_text: {count} characters, at most {max} are allowed"
        ));
    }
    // char::is_control is exactly the Cc category: C0, DEL and C1.
    if let Some(c) = s.chars().find(|c| c.is_control()) {
        return Err(format!(
            "free_text: control character U+{:04X} is not allowed",
            u32::from(c)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // Generated with ssh-keygen (OpenSSH 9) for these tests; public halves only.
    const ED25519: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIF/SUHBDvKyxyTSdWhVy3aW9EfGk0dqw7VPScisiWpHH test@kloigos";
    const RSA2048: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQDJbBlV8XokOc2mINDJ+rppngYM1X9t4w3XBpLGnRUSwrY1Ml9O3+q1WuyVmxacdzJVICm8TW5ElkwZr/YKYIU1mTq64uHyLWcNOzLcdwirxpWG2rOKL2BjPR7AdgfB/c4KiFujxU5Qlt+PIV0r2Py2UYrN8F2JH99jsRGm+IncyWAlHEqfmfPtiu/rIMxA4hXyxTX4LYZwQGDrEIvPxag2SByh/L4i1dHom7YhUkB76hr8Dw5TIZLIaP/tbHHtEZB+NKjEt/wg0S3aboyLq8ftDOP6NHYKWnTan+z9eiTsjxVGZVArt8sBzpnTIK4xd1DlzBCgLr6Jjsi3ZJoClqZ5 test@kloigos";
    const RSA1024: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQDi1NuvfnbLzsmFq5izG7gzxXG3an73/KnaRHNGwolVJlD4IZsHuLcU/h9G8jN+dZosfKhjKcLP+Vlde5X9omR7NF2k3lxaTKvnRxiSoB+4jzD9lvn1A3k8dbDNnz+wwqsg2BRdpyrjZTIFoKOX5DH/HJymyiZhOICPuZn2/dg1uQ== test@kloigos";
    const RSA3072: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABgQC4pstE9nG3aRDNtnQR0IdLf6G+NOchCkbfDnCiVCcGazK/CkZk/tw5D2qkNeUBTHueBlaTBHU0y0wR9RCmAVjCo6ufk3xbxGnwsA+sD9a+tBaY5OUn+YtMZGtb+Zng1gDmart6xkCtl/4RcYHVZC06h6KB5fyo4IFlDMBBo5SkgI+bFrtlIkrwPWw7/8Xdod8dmRPEE3rg+X0vn0qsPUPVHedwvaCDsVc0/KYWn0pOOrqfPbz8UyhgteQkJAHHtIK1AD+H2r1QrhMR4Mue9lUoPdQgtGfdkMnDM4HKbtv9jcNhgbRdbJf2PYSdNsoTvMzccZ0j4J064PuAziHxCuAfOKMx1KFsB5UZU/iJK4BqoRr6RoiQRlmfuO6l9R9VfN4FkuLidscyWikwdnUMC3NNFahkZZ4zF7Z/e4cvvH+MbXOCd0jYyUQ8CevYzHfQZK4XmCUcdPMbUfOAWNCSKQzgJNNEzRRJuaS1oysx1F3NRlewWr2gy2gC5AML0aSUdvs= test@kloigos";
    const P256: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBPTYqh3BHCzjWVmAllhD9UQBTWchGSwbNWgQxBZeDDzrxWV+uWk2xtAj8uqxrmMXytyGau/SO9JNRnl2QHfvBjA= test@kloigos";
    const P384: &str = "ecdsa-sha2-nistp384 AAAAE2VjZHNhLXNoYTItbmlzdHAzODQAAAAIbmlzdHAzODQAAABhBEUct2BWfjY1OKgAgMHjTKqKStceq8iCNRSgG2minKaWUg0VCedDCtbm/zisJxbfAupnxXG1yKgpXcSSzkt7QjSutGJQxWxGm7iwRgHAmlJki2lD8PMQosEl5ehpn5qrAQ== test@kloigos";
    const P521: &str = "ecdsa-sha2-nistp521 AAAAE2VjZHNhLXNoYTItbmlzdHA1MjEAAAAIbmlzdHA1MjEAAACFBAEnhxF11vxQ/9+C0tONKGN9Yv43o935e/SexqDxfaqHCTqZqAuxSyEck5CUUs/reCQQJ6YDyumXjWlleTTe+DUMLQGR6SD5eSOYZsyejMwzW0M5GCozysh1CHmY6J8ofQiUb2T/ur3kPSc2RgC5t9kNCCqC8vAOO1lCXafdUbmKePOrrQ==";

    /// SSH wire-format encoding of fields, for hand-built blobs.
    fn wire(fields: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for f in fields {
            out.extend_from_slice(&(f.len() as u32).to_be_bytes());
            out.extend_from_slice(f);
        }
        out
    }

    fn b64(bytes: &[u8]) -> String {
        STANDARD.encode(bytes)
    }

    fn point(len: usize) -> Vec<u8> {
        let mut q = vec![7u8; len];
        q[0] = 4;
        q
    }

    /// Security-key blobs built by the format of OpenSSH's PROTOCOL.u2f.
    fn sk_ed25519() -> String {
        let kind = "sk-ssh-ed25519@openssh.com";
        format!(
            "{kind} {} yubikey",
            b64(&wire(&[kind.as_bytes(), &[9; 32], b"ssh:"]))
        )
    }

    fn sk_ecdsa() -> String {
        let kind = "sk-ecdsa-sha2-nistp256@openssh.com";
        let blob = wire(&[kind.as_bytes(), b"nistp256", &point(65), b"ssh:"]);
        format!("{kind} {}", b64(&blob))
    }

    fn blob_of(line: &str) -> &str {
        line.split(' ').nth(1).unwrap()
    }

    fn reject(input: &str, expected: &str) {
        match ssh_public_key(input) {
            Err(msg) => {
                assert!(msg.starts_with("ssh_public_key: "), "{msg}");
                assert!(
                    msg.contains(expected),
                    "{input:?}: {msg:?} lacks {expected:?}"
                );
            }
            Ok(k) => panic!("{input:?} should be rejected, got {k:?}"),
        }
    }

    #[test]
    fn hostname_table() {
        let long_label = "a".repeat(63);
        let ok = [
            "host1",
            "h",
            "1",
            "db-1.example.com",
            "a-b-c",
            "123.456",
            long_label.as_str(),
        ];
        for h in ok {
            assert_eq!(hostname(h), Ok(()), "{h}");
        }
        let max = [
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(61),
        ]
        .join(".");
        assert_eq!(max.len(), 253);
        assert_eq!(hostname(&max), Ok(()));

        let too_long = format!("{max}e");
        let bad_label = "a".repeat(64);
        let bad: &[(&str, &str)] = &[
            ("", "must not be empty"),
            (&too_long, "at most 253"),
            (&bad_label, "longer than 63"),
            ("Host1", "character 'H'"),
            ("host_1", "character '_'"),
            ("host 1", "character ' '"),
            ("host\n", "character '\\n'"),
            ("hôst", "character 'ô'"),
            ("-host", "must not start or end with '-'"),
            ("host-", "must not start or end with '-'"),
            ("a.-b.c", "must not start or end with '-'"),
            (".host", "empty label"),
            ("host.", "empty label"),
            ("a..b", "empty label"),
            (".", "empty label"),
        ];
        for (h, expected) in bad {
            let msg = hostname(h).unwrap_err();
            assert!(msg.starts_with("hostname: "), "{msg}");
            assert!(msg.contains(expected), "{h:?}: {msg:?} lacks {expected:?}");
        }
    }

    #[test]
    fn label_table() {
        let max = "z".repeat(64);
        for l in ["eu-west-1", "zone_a", "Z1", "1a", "a.b", max.as_str()] {
            assert_eq!(label(l), Ok(()), "{l}");
        }
        let too_long = "z".repeat(65);
        let bad: &[(&str, &str)] = &[
            ("", "must not be empty"),
            (&too_long, "at most 64"),
            ("-a", "must start with a letter or digit"),
            (".a", "must start with a letter or digit"),
            ("_a", "must start with a letter or digit"),
            ("a b", "character ' '"),
            ("a/b", "character '/'"),
            ("é", "character 'é'"),
            ("a\tb", "character '\\t'"),
        ];
        for (l, expected) in bad {
            let msg = label(l).unwrap_err();
            assert!(msg.starts_with("label: "), "{msg}");
            assert!(msg.contains(expected), "{l:?}: {msg:?} lacks {expected:?}");
        }
    }

    #[test]
    fn tag_key_table() {
        let max = "k".repeat(64);
        for k in [
            "deployment_id",
            "owner",
            "app.kubernetes.io/name",
            "a:b",
            "-x",
            max.as_str(),
        ] {
            assert_eq!(tag_key(k), Ok(()), "{k}");
        }
        let too_long = "k".repeat(65);
        let bad: &[(&str, &str)] = &[
            ("", "must not be empty"),
            (&too_long, "at most 64"),
            ("a b", "character ' '"),
            ("a=b", "character '='"),
            ("ключ", "character 'к'"),
            ("a\0", "character '\\0'"),
        ];
        for (k, expected) in bad {
            let msg = tag_key(k).unwrap_err();
            assert!(msg.starts_with("tag_key: "), "{msg}");
            assert!(msg.contains(expected), "{k:?}: {msg:?} lacks {expected:?}");
        }
    }

    #[test]
    fn free_text_table() {
        assert_eq!(free_text("", 0), Ok(()));
        assert_eq!(free_text("team blue — ünïcode ✓", 21), Ok(()));
        assert!(
            free_text("team blue — ünïcode ✓", 20)
                .unwrap_err()
                .contains("at most 20")
        );
        let bad: &[(&str, &str)] = &[
            ("a\nb", "U+000A"),
            ("a\tb", "U+0009"),
            ("a\0b", "U+0000"),
            ("a\u{7f}b", "U+007F"),
            ("a\u{85}b", "U+0085"),
            ("a\u{9f}b", "U+009F"),
            ("\r", "U+000D"),
            ("\u{1b}[31m", "U+001B"),
        ];
        for (text, expected) in bad {
            let msg = free_text(text, 100).unwrap_err();
            assert!(msg.starts_with("free_text: "), "{msg}");
            assert!(
                msg.contains(expected),
                "{text:?}: {msg:?} lacks {expected:?}"
            );
        }
    }

    #[test]
    fn accepts_every_known_key_type() {
        let sk_ed = sk_ed25519();
        let sk_ec = sk_ecdsa();
        let cases: &[(&str, &str, Option<&str>)] = &[
            (ED25519, "ssh-ed25519", Some("test@kloigos")),
            (RSA2048, "ssh-rsa", Some("test@kloigos")),
            (RSA3072, "ssh-rsa", Some("test@kloigos")),
            (P256, "ecdsa-sha2-nistp256", Some("test@kloigos")),
            (P384, "ecdsa-sha2-nistp384", Some("test@kloigos")),
            (P521, "ecdsa-sha2-nistp521", None),
            (&sk_ed, "sk-ssh-ed25519@openssh.com", Some("yubikey")),
            (&sk_ec, "sk-ecdsa-sha2-nistp256@openssh.com", None),
        ];
        for (line, kind, comment) in cases {
            let key = ssh_public_key(line).unwrap_or_else(|e| panic!("{line}: {e}"));
            assert_eq!(key.kind, *kind);
            assert_eq!(key.blob, blob_of(line));
            assert_eq!(key.comment.as_deref(), *comment);
            assert_eq!(key.to_line(), *line, "to_line gives the line back");
        }
    }

    #[test]
    fn accepts_whitespace_around_and_between() {
        let key = ssh_public_key(&format!("  {ED25519}\n")).unwrap();
        assert_eq!(key.to_line(), ED25519);
        let key = ssh_public_key(&format!("{ED25519}\r\n")).unwrap();
        assert_eq!(key.to_line(), ED25519);
        let spaced = format!("ssh-ed25519   {}   my laptop  key ", blob_of(ED25519));
        let key = ssh_public_key(&spaced).unwrap();
        assert_eq!(key.comment.as_deref(), Some("my laptop  key"));
        assert_eq!(
            key.to_line(),
            format!("ssh-ed25519 {} my laptop  key", blob_of(ED25519))
        );
        // A comment naming a key type is fine as long as it is not a second key.
        let key = ssh_public_key(&format!("{ED25519} my ssh-rsa key")).unwrap();
        assert_eq!(key.comment.as_deref(), Some("test@kloigos my ssh-rsa key"));
    }

    #[test]
    fn rejects_bad_lines() {
        let blob = blob_of(ED25519);
        let two_lines = format!("{ED25519}\n{P256}");
        let two_keys = format!("{ED25519} {P256}");
        let cr_inside = format!("{ED25519}\rextra");
        let tab = format!("ssh-ed25519\t{blob}");
        let nul = format!("{ED25519}\0");
        let del = format!("{ED25519} a\u{7f}");
        let c1 = format!("{ED25519} \u{85}x");
        let opts = format!("command=\"echo hi\" {ED25519}");
        let restrict = format!("restrict {ED25519}");
        let no_pty = format!("no-pty,no-port-forwarding {RSA2048}");
        let long_comment = format!("ssh-ed25519 {blob} {}", "c".repeat(257));
        let huge = format!("ssh-ed25519 {blob} {}", "c".repeat(17 * 1024));
        let cases: &[(&str, &str)] = &[
            ("", "must not be empty"),
            (" \n", "must not be empty"),
            (&two_lines, "exactly one key on one line"),
            (&two_keys, "exactly one key on one line"),
            (&cr_inside, "exactly one key on one line"),
            (&tab, "control characters"),
            (&nul, "control characters"),
            (&del, "control characters"),
            (&c1, "control characters"),
            (&opts, "options before the key type are not allowed"),
            (&restrict, "options before the key type are not allowed"),
            (&no_pty, "options before the key type are not allowed"),
            ("foo AAAA", "unknown key type 'foo'"),
            ("ssh-dss AAAAB3NzaC1kc3MAAAA=", "unknown key type 'ssh-dss'"),
            ("SSH-ED25519 AAAA", "unknown key type 'SSH-ED25519'"),
            ("ssh-ed25519", "missing key data after 'ssh-ed25519'"),
            ("ssh-ed25519 ", "missing key data"),
            ("ssh-ed25519 not*base64", "not valid base64"),
            ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIF", "not valid base64"),
            (&long_comment, "comment is longer than 256"),
            (&huge, "at most 16 KiB"),
        ];
        for (input, expected) in cases {
            reject(input, expected);
        }
        let exactly = format!("ssh-ed25519 {blob} {}", "c".repeat(256));
        assert!(ssh_public_key(&exactly).is_ok());
    }

    #[test]
    fn rejects_blob_of_another_type() {
        reject(
            &format!("ssh-rsa {}", blob_of(ED25519)),
            "key data is of type 'ssh-ed25519', not 'ssh-rsa'",
        );
        reject(
            &format!("ecdsa-sha2-nistp384 {}", blob_of(P256)),
            "of type 'ecdsa-sha2-nistp256', not 'ecdsa-sha2-nistp384'",
        );
        reject(
            &format!("ssh-ed25519 {}", b64(b"\0\0\0\x03foo")),
            "of type 'foo', not 'ssh-ed25519'",
        );
        // Too short to hold a length, or a length longer than the data.
        reject(
            &format!("ssh-ed25519 {}", b64(b"\0\0")),
            "not an SSH public key",
        );
        reject(
            &format!("ssh-ed25519 {}", b64(b"\0\0\0\x20ssh-ed25519")),
            "not an SSH public key",
        );
        reject(
            &format!("ssh-ed25519 {}", b64(b"\xff\xff\xff\xff")),
            "not an SSH public key",
        );
    }

    #[test]
    fn rejects_malformed_key_data() {
        let ed = b"ssh-ed25519".as_slice();
        let p256 = b"ecdsa-sha2-nistp256".as_slice();
        let rsa = b"ssh-rsa".as_slice();
        let modulus_2048 = {
            let mut n = vec![0u8];
            n.extend(vec![0xc5; 256]);
            n
        };
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("ssh-ed25519", wire(&[ed]), "malformed ssh-ed25519"),
            (
                "ssh-ed25519",
                wire(&[ed, &[1; 31]]),
                "malformed ssh-ed25519",
            ),
            (
                "ssh-ed25519",
                wire(&[ed, &[1; 33]]),
                "malformed ssh-ed25519",
            ),
            (
                "ssh-ed25519",
                wire(&[ed, &[1; 32], b"x"]),
                "unexpected data after",
            ),
            ("ssh-rsa", wire(&[rsa, &[1, 0, 1]]), "malformed ssh-rsa"),
            (
                "ssh-rsa",
                wire(&[rsa, &[], &modulus_2048]),
                "malformed ssh-rsa",
            ),
            (
                "ssh-rsa",
                wire(&[rsa, &[1, 0, 1], &[0xc5; 256]]),
                "malformed ssh-rsa",
            ),
            (
                "ssh-rsa",
                wire(&[rsa, &[1, 0, 1], &[0x7f; 256]]),
                "2047 bits is too weak",
            ),
            (
                "ecdsa-sha2-nistp256",
                wire(&[p256, b"nistp384", &point(65)]),
                "malformed ecdsa-sha2-nistp256",
            ),
            (
                "ecdsa-sha2-nistp256",
                wire(&[p256, b"nistp256", &point(64)]),
                "malformed ecdsa-sha2-nistp256",
            ),
            (
                "ecdsa-sha2-nistp256",
                wire(&[p256, b"nistp256", &[2; 65]]),
                "malformed ecdsa-sha2-nistp256",
            ),
            (
                "sk-ssh-ed25519@openssh.com",
                wire(&[b"sk-ssh-ed25519@openssh.com", &[9; 32]]),
                "malformed sk-ssh-ed25519@openssh.com",
            ),
        ];
        for (kind, blob, expected) in &cases {
            reject(&format!("{kind} {}", b64(blob)), expected);
        }
        // The same modulus with a 2048-bit value passes.
        let ok = wire(&[rsa, &[1, 0, 1], &modulus_2048]);
        assert!(ssh_public_key(&format!("ssh-rsa {}", b64(&ok))).is_ok());
    }

    #[test]
    fn rejects_short_rsa_key() {
        reject(
            RSA1024,
            "RSA key of 1024 bits is too weak, at least 2048 are required",
        );
    }

    #[test]
    fn mpint_bits_counts_significant_bits() {
        assert_eq!(mpint_bits(&[]), 0);
        assert_eq!(mpint_bits(&[0, 0]), 0);
        assert_eq!(mpint_bits(&[1]), 1);
        assert_eq!(mpint_bits(&[0, 0x80]), 8);
        assert_eq!(mpint_bits(&[0x01, 0x00]), 9);
    }

    #[test]
    fn unknown_type_in_message_is_shortened_and_escaped() {
        let msg = ssh_public_key(&"x".repeat(100)).unwrap_err();
        assert!(msg.len() < 100, "{msg}");
        assert!(msg.ends_with("…'"), "{msg}");
    }

    proptest! {
        #[test]
        fn ssh_key_never_panics(s in "\\PC{0,80}") {
            let _ = ssh_public_key(&s);
        }

        #[test]
        fn accepted_key_line_is_one_safe_line(comment in "[ -~]{0,40}") {
            let line = format!("{ED25519} {comment}");
            if let Ok(key) = ssh_public_key(&line) {
                let out = key.to_line();
                prop_assert!(!out.chars().any(char::is_control));
                prop_assert_eq!(ssh_public_key(&out), Ok(key));
            }
        }

        #[test]
        fn hostname_accepts_generated_names(h in "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\\.[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?){0,3}") {
            prop_assert_eq!(hostname(&h), Ok(()));
        }

        #[test]
        fn free_text_rejects_any_control(prefix in "[a-z]{0,5}", c in prop::sample::select((0u32..0x20).chain(0x7f..0xa0).collect::<Vec<_>>())) {
            let s = format!("{prefix}{}", char::from_u32(c).unwrap());
            prop_assert!(free_text(&s, 100).is_err());
        }
    }
}
