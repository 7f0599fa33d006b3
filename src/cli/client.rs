//! The client side of the command line: one API request per command, over the unix socket or
//! TCP (`--url`), with the reply printed as a table or `--json` and errors explained.

use super::error::{CliError, Result};
use super::output::{print_table, print_units, printable, text};
use super::{Command, HostAction};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::{Value, json};

pub(super) struct Reply {
    pub(super) status: u16,
    pub(super) body: Value,
}

async fn request(
    socket: &std::path::Path,
    url: Option<&str>,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<Reply> {
    request_as(socket, url, None, method, path, body).await
}

/// One request, with `Authorization: Bearer TOKEN` when a token is given.
pub(super) async fn request_as(
    socket: &std::path::Path,
    url: Option<&str>,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<Reply> {
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    let (host, send) = match url {
        Some(u) => {
            let (authority, host, port) = tcp_target(u)?;
            let stream = tokio::net::TcpStream::connect((host.as_str(), port))
                .await
                .map_err(CliError::io(format!("cannot connect to {authority}")))?;
            let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(CliError::http)?;
            tokio::spawn(conn);
            (authority, send)
        }
        None => {
            let stream = tokio::net::UnixStream::connect(socket)
                .await
                .map_err(CliError::io(format!(
                    "cannot connect to {} (is kloigos.socket running? or use --url)",
                    socket.display()
                )))?;
            let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(CliError::http)?;
            tokio::spawn(conn);
            ("localhost".to_string(), send)
        }
    };
    let mut send = send;
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, host)
        .header(hyper::header::CONTENT_TYPE, "application/json");
    if let Some(t) = token {
        req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = req
        .body(Full::new(Bytes::from(payload)))
        .map_err(CliError::http)?;
    let resp = send.send_request(req).await.map_err(CliError::http)?;
    let status = resp.status().as_u16();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(CliError::http)?
        .to_bytes();
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    Ok(Reply { status, body })
}

pub(super) fn query(pairs: &[(&str, &Option<String>)]) -> String {
    let q: Vec<String> = pairs
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", encode(v))))
        .collect();
    if q.is_empty() {
        String::new()
    } else {
        format!("?{}", q.join("&"))
    }
}

/// What a path segment or query value keeps as is (RFC 3986 unreserved); the rest is `%XX`.
const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

fn encode(s: &str) -> String {
    utf8_percent_encode(s, UNRESERVED).to_string()
}

/// The `Host` header, host and port to connect to for `--url http://HOST[:PORT][/...]`.
fn tcp_target(url: &str) -> Result<(String, String, u16)> {
    let usage = |why: String| CliError::Usage(format!("--url {url:?}: {why}"));
    let uri: http::Uri = url.parse().map_err(|e| usage(format!("not a URL ({e})")))?;
    if uri.scheme_str() != Some("http") {
        return Err(usage("must start with http://".into()));
    }
    let authority = uri.authority().ok_or_else(|| usage("no host".into()))?;
    if authority.as_str().contains('@') {
        return Err(usage(
            "credentials in the URL are not supported (use a token)".into(),
        ));
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    Ok((
        authority.as_str().to_string(),
        host.to_string(),
        authority.port_u16().unwrap_or(80),
    ))
}

/// Explains an error reply on stderr.
pub(super) fn explain(reply: &Reply) -> CliError {
    match reply.body.get("detail") {
        Some(Value::Array(items)) => {
            let lines: Vec<String> = items
                .iter()
                .map(|i| {
                    let loc: Vec<String> = i["loc"]
                        .as_array()
                        .map(|l| {
                            l.iter()
                                .map(|p| {
                                    p.as_str()
                                        .map(String::from)
                                        .unwrap_or_else(|| p.to_string())
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    format!(
                        "  {}: {}",
                        printable(&loc.join(".")),
                        printable(i["msg"].as_str().unwrap_or("invalid"))
                    )
                })
                .collect();
            CliError::Refused(format!(
                "invalid request (HTTP {}):\n{}",
                reply.status,
                lines.join("\n")
            ))
        }
        Some(Value::String(d)) => {
            CliError::Refused(format!("{} (HTTP {})", printable(d), reply.status))
        }
        _ => CliError::Refused(format!("HTTP {}: {}", reply.status, reply.body)),
    }
}

fn read_key(arg: &str) -> Result<String> {
    if arg == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .map_err(CliError::io("cannot read the key from stdin"))?;
        return Ok(s);
    }
    let looks_like_key = ["ssh-", "ecdsa-", "sk-"].iter().any(|p| arg.starts_with(p));
    if looks_like_key {
        return Ok(arg.to_string());
    }
    std::fs::read_to_string(arg).map_err(CliError::io(format!("cannot read the key file {arg}")))
}

fn parse_tags(tags: &[String]) -> Result<Value> {
    let mut out = serde_json::Map::new();
    for t in tags {
        if let Some((k, v)) = t.split_once(":=") {
            let v: Value = serde_json::from_str(v).map_err(|source| CliError::NotJson {
                what: format!("--tag {t}"),
                source,
            })?;
            out.insert(k.to_string(), v);
        } else if let Some((k, v)) = t.split_once('=') {
            out.insert(k.to_string(), Value::String(v.to_string()));
        } else {
            return Err(CliError::Usage(format!(
                "--tag {t}: expected KEY=VALUE or KEY:=JSON"
            )));
        }
    }
    Ok(Value::Object(out))
}

/// Who applies a server: this host, a joined fleet host (with its state), or nobody
/// (inventory only).
fn applied_by(s: &Value) -> String {
    if s["inventory_only"] == json!(true) {
        return "inventory only".into();
    }
    if s["local"] == json!(true) {
        return "this host".into();
    }
    if s["host"].is_null() {
        return "unknown host".into();
    }
    host_state(&s["host"])
}

/// A fleet host's state in a few words: joined, age of its last report, version,
/// unreachable, stale, drift count.
fn host_state(h: &Value) -> String {
    if h["joined"] != json!(true) {
        return "not joined".into();
    }
    let mut parts = vec![match h["last_report_at"].as_str().and_then(age) {
        Some(secs) => format!("report {secs}s ago"),
        None => "no report".into(),
    }];
    if let Some(v) = h["version"].as_str() {
        parts.push(format!("v{v}"));
    }
    if h["unreachable_since"].is_string() {
        parts.push(format!(
            "UNREACHABLE since {}",
            text(&h["unreachable_since"])
        ));
    }
    if h["stale"] == json!(true) {
        parts.push("STALE".into());
    }
    let drift = h["drift"].as_array().map(Vec::len).unwrap_or(0);
    if drift > 0 {
        parts.push(format!("drift {drift}"));
    }
    parts.join(", ")
}

/// Whole seconds since an RFC 3339 time.
fn age(t: &str) -> Option<i64> {
    let then =
        time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()?;
    Some(
        (time::OffsetDateTime::now_utc() - then)
            .whole_seconds()
            .max(0),
    )
}

/// Writes a secret to `path`, mode 0600, atomically (a temporary file renamed over it).
fn write_secret(path: &std::path::Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let tmp = dir.join(format!(".kloigos-token.{}", std::process::id()));
    let what = format!("cannot write {}", path.display());
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        CliError::io(what)(e)
    })
}

pub(super) fn client(
    socket: &std::path::Path,
    url: Option<&str>,
    as_json: bool,
    cmd: Command,
) -> Result<()> {
    let (method, path, body) = match &cmd {
        Command::Units {
            compute_id,
            hostname,
            region,
            zone,
            cpu_count,
            deployment_id,
            status,
        } => (
            "GET",
            format!(
                "/api/compute_units/{}",
                query(&[
                    ("compute_id", compute_id),
                    ("hostname", hostname),
                    ("region", region),
                    ("zone", zone),
                    ("cpu_count", cpu_count),
                    ("deployment_id", deployment_id),
                    ("status", status),
                ])
            ),
            None,
        ),
        Command::Unit { compute_id } => (
            "GET",
            format!("/api/compute_units/{}", encode(compute_id)),
            None,
        ),
        Command::Allocate {
            cpu_count,
            region,
            zone,
            tags,
            ssh_key,
            inventory_only,
        } => {
            let mut body = json!({
                "cpu_count": cpu_count,
                "region": region,
                "zone": zone,
                "tags": if tags.is_empty() { Value::Null } else { parse_tags(tags)? },
                "ssh_public_key": read_key(ssh_key)?.trim(),
            });
            if *inventory_only {
                body["inventory_only"] = json!(true);
            }
            (
                "POST",
                "/api/compute_units/allocate".to_string(),
                Some(body),
            )
        }
        Command::Deallocate { compute_id } => (
            "DELETE",
            format!("/api/compute_units/deallocate/{}", encode(compute_id)),
            None,
        ),
        Command::Servers => ("GET", "/api/admin/servers".to_string(), None),
        Command::InitServer {
            hostname,
            ip,
            region,
            zone,
            cpu_ranges,
            port_base,
            ports_per_cpu,
            uid_base,
            limits,
            inventory_only,
        } => {
            let mut body = json!({
                "ip": ip, "region": region, "zone": zone, "hostname": hostname, "cpu_ranges": cpu_ranges,
            });
            if *inventory_only {
                body["inventory_only"] = json!(true);
            }
            for (k, v) in [
                ("port_base", port_base.map(u32::from)),
                ("ports_per_cpu", ports_per_cpu.map(u32::from)),
                ("uid_base", *uid_base),
            ] {
                if let Some(v) = v {
                    body[k] = json!(v);
                }
            }
            if let Some(l) = limits {
                body["limits"] = serde_json::from_str(l).map_err(|source| CliError::NotJson {
                    what: "--limits".into(),
                    source,
                })?;
            }
            ("POST", "/api/admin/init_server".to_string(), Some(body))
        }
        Command::Decommission { hostname, force } => (
            "DELETE",
            format!(
                "/api/admin/decommission_server/{}{}",
                encode(hostname),
                if *force { "?force=true" } else { "" }
            ),
            None,
        ),
        Command::Host { action } => match action {
            HostAction::Add { name, .. } => (
                "POST",
                "/api/admin/hosts".to_string(),
                Some(json!({ "hostname": name })),
            ),
            HostAction::List => ("GET", "/api/admin/hosts".to_string(), None),
            HostAction::Remove { name } => {
                ("DELETE", format!("/api/admin/hosts/{}", encode(name)), None)
            }
        },
        Command::Events {
            compute_id,
            hostname,
            operation,
            actor,
            limit,
        } => (
            "GET",
            format!(
                "/api/events{}",
                query(&[
                    ("compute_id", compute_id),
                    ("hostname", hostname),
                    ("operation", operation),
                    ("actor", actor),
                    ("limit", &Some(limit.to_string())),
                ])
            ),
            None,
        ),
        Command::Serve { .. }
        | Command::Join { .. }
        | Command::Pull { .. }
        | Command::Leave { .. }
        | Command::Reconcile { .. }
        | Command::Render { .. }
        | Command::Doctor { .. }
        | Command::Token { .. }
        | Command::Inventory(_) => {
            unreachable!("local commands are handled by cli::run")
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CliError::io("cannot start the async runtime"))?;
    let reply = rt.block_on(request(socket, url, method, &path, body))?;
    if !(200..300).contains(&reply.status) {
        return Err(explain(&reply));
    }
    // A host's token goes to the file asked for, never to the terminal too.
    if let Command::Host {
        action: HostAction::Add {
            name,
            token_file: Some(out),
        },
    } = &cmd
    {
        let token = reply.body["token"].as_str().unwrap_or_default();
        write_secret(out, &format!("{token}\n"))?;
        println!("host {name}: token written to {}", out.display());
        return Ok(());
    }
    if as_json {
        println!("{}", serde_json::to_string_pretty(&reply.body)?);
        return Ok(());
    }
    match cmd {
        Command::Units { .. } => {
            print_units(reply.body.as_array().map(Vec::as_slice).unwrap_or(&[]))
        }
        Command::Unit { .. } | Command::Allocate { .. } => {
            print_units(std::slice::from_ref(&reply.body))
        }
        Command::Servers => print_table(
            &[
                "HOSTNAME",
                "IP",
                "REGION",
                "ZONE",
                "STATUS",
                "CPU RANGES",
                "LOCAL",
                "APPLIED BY",
            ],
            reply
                .body
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or(&[])
                .iter()
                .map(|s| {
                    vec![
                        text(&s["hostname"]),
                        text(&s["ip"]),
                        text(&s["region"]),
                        text(&s["zone"]),
                        text(&s["status"]),
                        s["cpu_ranges"]
                            .as_array()
                            .map(|a| a.iter().map(text).collect::<Vec<_>>().join(" "))
                            .unwrap_or_default(),
                        text(&s["local"]),
                        applied_by(s),
                    ]
                })
                .collect(),
        ),
        Command::Host {
            action: HostAction::List,
        } => print_table(
            &["HOSTNAME", "JOINED", "STATE", "POKE URL", "FAILED UNITS"],
            reply
                .body
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or(&[])
                .iter()
                .map(|h| {
                    vec![
                        text(&h["hostname"]),
                        text(&h["joined_at"]),
                        host_state(h),
                        text(&h["poke_url"]),
                        h["units_failed"]
                            .as_array()
                            .map(|a| a.len().to_string())
                            .unwrap_or_else(|| "0".into()),
                    ]
                })
                .collect(),
        ),
        Command::Host {
            action: HostAction::Add { name, .. },
        } => {
            // The token alone on stdout (for scripts); the note on stderr.
            println!("{}", text(&reply.body["token"]));
            eprintln!(
                "token of host {name}: shown only once; give it to `kloigos join --token-file`"
            );
        }
        Command::Host {
            action: HostAction::Remove { name },
        } => println!("host {name} removed"),
        Command::Events { .. } => print_table(
            &[
                "ID",
                "TIME",
                "ACTOR",
                "OPERATION",
                "TARGET",
                "RESULT",
                "DETAIL",
            ],
            reply
                .body
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or(&[])
                .iter()
                .map(|e| {
                    let target = if e["compute_id"].is_string() {
                        text(&e["compute_id"])
                    } else {
                        text(&e["hostname"])
                    };
                    vec![
                        text(&e["id"]),
                        text(&e["time"]),
                        text(&e["actor"]),
                        text(&e["operation"]),
                        target,
                        text(&e["result"]),
                        text(&e["detail"]),
                    ]
                })
                .collect(),
        ),
        Command::Deallocate { compute_id } => println!("{compute_id} deallocated"),
        Command::InitServer { hostname, .. } => println!("server {hostname} initialized"),
        Command::Decommission { hostname, .. } => println!("server {hostname} decommissioned"),
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_give_host_and_port() {
        let t = |u: &str| tcp_target(u).map_err(|e| e.to_string());
        assert_eq!(
            t("http://127.0.0.1:8000").unwrap(),
            ("127.0.0.1:8000".into(), "127.0.0.1".into(), 8000)
        );
        assert_eq!(
            t("http://[::1]:8000/api").unwrap(),
            ("[::1]:8000".into(), "::1".into(), 8000)
        );
        assert_eq!(
            t("http://localhost").unwrap(),
            ("localhost".into(), "localhost".into(), 80)
        );
        assert!(t("https://localhost:1").unwrap_err().contains("http://"));
        assert!(t("localhost:8000").is_err());
        assert!(
            t("http://u:p@localhost:8000")
                .unwrap_err()
                .contains("credentials")
        );
    }

    #[test]
    fn path_segments_and_values_are_percent_encoded() {
        assert_eq!(encode("h1_0-15.~"), "h1_0-15.~");
        assert_eq!(encode("a b/c?d&e=f%"), "a%20b%2Fc%3Fd%26e%3Df%25");
        assert_eq!(encode("ελ"), "%CE%B5%CE%BB");
        assert_eq!(
            query(&[
                ("a", &Some("x y".into())),
                ("b", &None),
                ("c", &Some("0,2".into()))
            ]),
            "?a=x%20y&c=0%2C2"
        );
        assert_eq!(query(&[("a", &None)]), "");
    }
}
