//! Unit tests of the API's pure parts: parsing, error bodies, the document.

use super::errors::detail_json;
use super::parse::{json_object, lax_int, query_map};
use super::schema::common_errors;
use super::*;
use axum::body::Bytes;
use axum::http::StatusCode;
use serde_json::{Map, Value, json};

#[test]
fn queries_are_percent_decoded() {
    let q = query_map(Some(
        "a=x%20y+z&b=0%2C2&bad=%zz&trail=%2&b=last&flag&=v&%CE%B5=%FF",
    ));
    let get = |k: &str| q.get(k).map(String::as_str);
    assert_eq!(get("a"), Some("x y z"));
    assert_eq!(
        get("b"),
        Some("last"),
        "the last of repeated parameters wins"
    );
    assert_eq!(get("bad"), Some("%zz"));
    assert_eq!(get("trail"), Some("%2"));
    assert_eq!(get("flag"), Some(""));
    assert_eq!(get(""), Some("v"));
    assert_eq!(get("ε"), Some("\u{fffd}"));
    assert!(query_map(None).is_empty());
}

#[test]
fn lax_integers() {
    assert_eq!(lax_int(&json!(4)).unwrap(), Some(4));
    assert_eq!(lax_int(&json!(4.0)).unwrap(), Some(4));
    assert_eq!(lax_int(&json!("8")).unwrap(), Some(8));
    assert_eq!(lax_int(&json!(null)).unwrap(), None);
    assert_eq!(lax_int(&json!(4.5)).unwrap_err().kind, "int_from_float");
    assert_eq!(lax_int(&json!("x")).unwrap_err().kind, "int_parsing");
    assert_eq!(lax_int(&json!([1])).unwrap_err().kind, "int_type");
}

#[test]
fn plain_error_bodies_become_detail() {
    assert_eq!(
        detail_json(
            StatusCode::PAYLOAD_TOO_LARGE,
            b"Failed to buffer the request body: length limit exceeded\n"
        ),
        json!({"detail": "Failed to buffer the request body: length limit exceeded"})
    );
    assert_eq!(
        detail_json(StatusCode::BAD_REQUEST, b"  "),
        json!({"detail": "Bad Request"})
    );
    assert_eq!(
        detail_json(StatusCode::BAD_REQUEST, b"\xff bad"),
        json!({"detail": "\u{fffd} bad"})
    );
}

#[test]
fn which_operations_declare_which_errors() {
    assert_eq!(
        common_errors("/api/compute_units/allocate", true),
        ["401", "403", "408", "413", "415", "500", "503"]
    );
    assert_eq!(
        common_errors("/api/compute_units/{compute_id}", false),
        ["400", "401", "403", "500", "503"]
    );
    assert_eq!(
        common_errors("/api/admin/decommission_server/{hostname}", false),
        ["400", "401", "403", "500", "503"]
    );
    assert_eq!(common_errors("/healthz", false), ["403", "500", "503"]);
}

/// What the API sends as a validation error matches what the document declares.
#[test]
fn field_errors_match_the_validation_error_schema() {
    let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
    let schema = &doc["components"]["schemas"]["ValidationError"];
    let declared: Vec<&str> = schema["properties"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let required: Vec<&str> = schema["required"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let errors = parse_init_server(&Bytes::from_static(
        br#"{"ip": "x", "cpu_ranges": ["0-3", 7], "limits": {"io_weight": 0}}"#,
    ))
    .unwrap_err();
    assert!(errors.len() > 3, "{errors:?}");
    for e in serde_json::to_value(&errors).unwrap().as_array().unwrap() {
        let sent = e.as_object().unwrap();
        for k in sent.keys() {
            assert!(declared.contains(&k.as_str()), "{k} not declared: {schema}");
        }
        for k in &required {
            assert!(sent.contains_key(*k), "{k} missing from {e}");
        }
        for step in e["loc"].as_array().unwrap() {
            assert!(step.is_string() || step.is_i64(), "{step} in {e}");
        }
    }
    let item_types: Vec<&str> = doc["components"]["schemas"]["LocItem"]["oneOf"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["type"].as_str())
        .collect();
    assert_eq!(item_types, ["string", "integer"]);
}

#[test]
fn tags_are_bounded_as_a_whole() {
    let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICWwemBpMBrDPybmEWyrw0JNlYbamL5YU3v8ozcLKi2u k";
    let body = |tags: Value| {
        Bytes::from(json!({"cpu_count": 2, "ssh_public_key": key, "tags": tags}).to_string())
    };
    let mut big = Map::new();
    for i in 0..20 {
        big.insert(format!("t{i}"), json!("x".repeat(250)));
    }
    let errors = parse_allocate(&body(Value::Object(big.clone()))).unwrap_err();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].loc, vec![json!("body"), json!("tags")]);
    assert!(errors[0].msg.contains("4096"), "{}", errors[0].msg);
    big.retain(|k, _| k.len() == 2 && k.as_str() < "t9");
    let ok = parse_allocate(&body(Value::Object(big))).map(|a| a.tags);
    assert!(
        matches!(ok, Ok(Some(Value::Object(ref m))) if m.len() == 9),
        "{ok:?}"
    );
}

#[test]
fn body_errors_have_fastapi_shape() {
    let e = json_object(&Bytes::from_static(b"")).unwrap_err();
    assert_eq!(
        serde_json::to_value(&e).unwrap(),
        json!([{"type": "missing", "loc": ["body"], "msg": "Field required", "input": null}])
    );
    let e = json_object(&Bytes::from_static(b"{\"a\": }")).unwrap_err();
    assert_eq!(e[0].kind, "json_invalid");
    assert_eq!(e[0].loc, vec![json!("body"), json!(6)]);
    let e = json_object(&Bytes::from_static(b"[1]")).unwrap_err();
    assert_eq!(e[0].kind, "model_attributes_type");
}

/// The document cannot drift from the parser: for each request body, the fields the parser
/// reads are exactly the schema's properties, required exactly where the schema says so; a
/// good body parses, dropping a field fails exactly when the schema requires it, null passes
/// exactly when the schema allows it, and a value of the wrong JSON type is refused at that
/// field.
#[test]
fn request_schemas_agree_with_the_parser() {
    type Read = fn(&mut parse::Fields<'_>) -> Result<(), Vec<FieldError>>;
    let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICWwemBpMBrDPybmEWyrw0JNlYbamL5YU3v8ozcLKi2u k";
    let cases: [(&str, Value, Read); 2] = [
        (
            "ComputeUnitRequest",
            json!({"cpu_count": 2, "region": "eu", "zone": "a", "tags": {"owner": "x"},
                   "ssh_public_key": key}),
            |f| parse::read_allocate(f).map(drop),
        ),
        (
            "InitServerRequest",
            json!({"ip": "192.0.2.1", "region": "eu", "zone": "a", "hostname": "h1",
                   "cpu_ranges": ["0-3"], "port_base": 2000, "ports_per_cpu": 100,
                   "uid_base": 20000, "limits": {"tasks_max": 10}}),
            |f| parse::read_init_server(f).map(drop),
        ),
    ];
    let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
    for (name, good, read) in cases {
        let schema = &doc["components"]["schemas"][name];
        let props = schema["properties"].as_object().unwrap();
        let required: Vec<&str> = schema["required"]
            .as_array()
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let run = |body: &Value| {
            let obj = body.as_object().unwrap();
            let mut f = parse::Fields::new(obj);
            let r = read(&mut f);
            (r, f.asked)
        };
        let (r, asked) = run(&good);
        assert!(r.is_ok(), "{name}: the good body is refused: {r:?}");
        let mut asked_names: Vec<&str> = asked.iter().map(|(n, _)| n.as_str()).collect();
        let mut declared: Vec<&str> = props.keys().map(String::as_str).collect();
        asked_names.sort_unstable();
        declared.sort_unstable();
        assert_eq!(asked_names, declared, "{name}: fields read vs declared");
        for (field, req) in &asked {
            assert_eq!(
                *req,
                required.contains(&field.as_str()),
                "{name}.{field}: the parser and the schema disagree on required"
            );
        }
        let errors_at = |r: Result<(), Vec<FieldError>>, field: &str| {
            r.err()
                .unwrap_or_default()
                .into_iter()
                .filter(|e| e.loc.get(1) == Some(&json!(field)))
                .collect::<Vec<_>>()
        };
        for (field, prop) in props {
            let types: Vec<&str> = match &prop["type"] {
                Value::String(t) => vec![t.as_str()],
                Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
                // A reference ($ref, oneOf with null): an object.
                _ => prop["oneOf"]
                    .as_array()
                    .map(|alts| {
                        alts.iter()
                            .map(|a| a["type"].as_str().unwrap_or("object"))
                            .collect()
                    })
                    .unwrap_or_else(|| vec!["object"]),
            };
            let mut without = good.clone();
            without.as_object_mut().unwrap().remove(field);
            let missing = errors_at(run(&without).0, field);
            assert_eq!(
                !missing.is_empty(),
                required.contains(&field.as_str()),
                "{name}.{field}: dropping it: {missing:?}"
            );
            let mut null = good.clone();
            null[field] = Value::Null;
            let refused = errors_at(run(&null).0, field);
            assert_eq!(
                refused.is_empty(),
                types.contains(&"null"),
                "{name}.{field} ({types:?}): null gives {refused:?}"
            );
            // A value of a type the field does not declare is refused at that field.
            let mut wrong = good.clone();
            let (bad, what) = if types.contains(&"boolean") {
                (json!({"not": "a boolean"}), "an object")
            } else {
                (json!(true), "a boolean")
            };
            wrong[field] = bad;
            assert!(
                !errors_at(run(&wrong).0, field).is_empty(),
                "{name}.{field} ({types:?}): {what} is accepted"
            );
        }
    }
}

/// Same for query strings: the parameters each handler reads are exactly the ones its
/// operation declares, with the same type, and a bad integer or boolean is a 422 at that name.
#[test]
fn query_parameters_agree_with_the_parser() {
    type Read = fn(&mut parse::Query) -> Result<(), Vec<FieldError>>;
    let cases: [(&str, &str, Read); 3] = [
        ("/api/compute_units/", "get", |q| {
            parse::unit_filter(q).map(drop)
        }),
        ("/api/events", "get", |q| parse::event_filter(q).map(drop)),
        ("/api/admin/decommission_server/{hostname}", "delete", |q| {
            parse::decommission_force(q).map(drop)
        }),
    ];
    let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
    for (path, method, read) in cases {
        let op = &doc["paths"][path][method];
        let mut declared: Vec<(String, String)> = op["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["in"] == "query")
            .map(|p| {
                assert_ne!(p["required"], json!(true), "{path}: {p}");
                let kind = match &p["schema"]["type"] {
                    Value::String(t) => t.clone(),
                    Value::Array(ts) => ts
                        .iter()
                        .filter_map(Value::as_str)
                        .find(|t| *t != "null")
                        .unwrap_or("?")
                        .to_string(),
                    other => panic!("{path}: {other}"),
                };
                (p["name"].as_str().unwrap().to_string(), kind)
            })
            .collect();
        let mut q = parse::Query::new(None);
        assert!(read(&mut q).is_ok(), "{path}: an empty query is refused");
        let mut asked: Vec<(String, String)> = q
            .asked
            .iter()
            .map(|(n, k)| (n.clone(), k.to_string()))
            .collect();
        declared.sort();
        asked.sort();
        assert_eq!(asked, declared, "{path}: parameters read vs declared");
        for (name, kind) in &asked {
            let mut q = parse::Query::new(Some(&format!("{name}=not-a-value")));
            let errors = read(&mut q).err().unwrap_or_default();
            let at_name = errors
                .iter()
                .any(|e| e.loc == vec![json!("query"), json!(name)]);
            assert_eq!(
                at_name,
                kind != "string",
                "{path} {name} ({kind}): {errors:?}"
            );
        }
    }
}

/// The service's typed problems become FastAPI's 422 items under `body`, and the service's own
/// message names the same place.
#[test]
fn service_problems_become_body_field_errors() {
    use crate::service::{Invalid, InvalidList, LocPart, OpError};
    let problem = Invalid {
        loc: vec![LocPart::Field("cpu_ranges"), LocPart::Index(1)],
        input: "2-5".into(),
        reason: "CPU range 2-5 overlaps cpu_ranges[0] (0-3)".into(),
    };
    let e = OpError::Invalid(InvalidList(vec![problem]));
    assert_eq!(
        e.to_string(),
        "invalid request: cpu_ranges[1] (\"2-5\"): CPU range 2-5 overlaps cpu_ranges[0] (0-3)"
    );
    let ApiError(status, body) = ApiError::from(e);
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        body,
        json!({"detail": [{
            "type": "value_error",
            "loc": ["body", "cpu_ranges", 1],
            "msg": "Value error, CPU range 2-5 overlaps cpu_ranges[0] (0-3)",
            "input": "2-5",
            "ctx": {"error": "CPU range 2-5 overlaps cpu_ranges[0] (0-3)"},
        }]})
    );
}
