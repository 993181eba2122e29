//! The HTTP API over real HTTP: every single-node path of DESIGN §2, its
//! errors and limits, authorisation, and the `mirrordb` binary's `serve`,
//! `healthcheck` and start-up refusals.

#![allow(clippy::unwrap_used)]

use mirrordb::config::Config;
use mirrordb::engine::replica::Role;
use mirrordb::journal::disk::FaultyDisk;
use mirrordb_tests::{
    ADMIN_TOKEN, ChildNode, NodeOptions, READ_TOKEN, TestNode, WRITE_TOKEN, phase, raw_http,
    run_mirrordb, seed,
};
use rand::{Rng, SeedableRng};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

/// The `error.code` of an error answer.
async fn code(resp: reqwest::Response) -> (StatusCode, String) {
    let status = resp.status();
    let body: Value = resp.json().await.unwrap();
    let code = body["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "error without a message: {body}"
    );
    (status, code)
}

/// Percent-encodes a query value.
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A query string from pairs.
fn query(pairs: &[(&str, String)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

#[tokio::test]
async fn records_round_trip_with_versions_and_etags() {
    let n = TestNode::start().await;
    let c = &n.client;

    phase("a put answers lsn and version; a get gives the body back byte-exact with the ETag");
    let body = r#"{"name": "Ada",  "tags":[1,2]}"#;
    let r = c
        .put(n.url("/v1/tables/users/records/ada"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let etag = r.headers()["etag"].to_str().unwrap().to_owned();
    let ack: Value = r.json().await.unwrap();
    let v1 = ack["version"].as_u64().unwrap();
    assert!(ack["lsn"].as_u64().unwrap() >= v1);
    assert_eq!(etag, format!("\"{v1}\""));
    let r = c
        .get(n.url("/v1/tables/users/records/ada"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["etag"], etag.as_str());
    assert_eq!(r.headers()["content-type"], "application/json");
    assert_eq!(r.text().await.unwrap(), body);

    phase("If-None-Match with the current ETag answers 304");
    let r = c
        .get(n.url("/v1/tables/users/records/ada"))
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);

    phase("a second put raises the version");
    let ack: Value = c
        .put(n.url("/v1/tables/users/records/ada"))
        .body(r#"{"name":"Ada L."}"#)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let v2 = ack["version"].as_u64().unwrap();
    assert!(v2 > v1);

    phase("keys with slashes, spaces and non-ASCII round-trip (raw and percent-encoded)");
    for (path, key) in [
        ("a/b/c", "a/b/c"),
        ("a%2Fb%20d", "a/b d"),
        ("%D0%BA%D0%BB%D1%8E%D1%87", "ключ"),
    ] {
        let r = c
            .put(n.url(&format!("/v1/tables/users/records/{path}")))
            .body("1")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        let page: Value = c
            .get(n.url(&format!("/v1/tables/users/records?prefix={}", enc(key))))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(page["records"][0]["key"], key, "{path}: {page}");
    }

    phase("delete, then the record is gone (404 not_found)");
    let r = c
        .delete(n.url("/v1/tables/users/records/ada"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let ack: Value = r.json().await.unwrap();
    assert!(ack["lsn"].as_u64().unwrap() > v2);
    let r = c
        .get(n.url("/v1/tables/users/records/ada"))
        .send()
        .await
        .unwrap();
    assert_eq!(code(r).await, (StatusCode::NOT_FOUND, "not_found".into()));
    n.stop().await;
}

#[tokio::test]
async fn version_conflicts_answer_409_and_write_nothing() {
    let n = TestNode::start().await;
    let c = &n.client;
    let url = n.url("/v1/tables/acct/records/k");

    phase("If-None-Match: * creates only when absent");
    let r = c
        .put(&url)
        .header("if-none-match", "*")
        .body(r#"{"n":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let v1: u64 = r.json::<Value>().await.unwrap()["version"]
        .as_u64()
        .unwrap();
    let r = c
        .put(&url)
        .header("if-none-match", "*")
        .body(r#"{"n":2}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(
        code(r).await,
        (StatusCode::CONFLICT, "version_conflict".into())
    );

    phase("If-Match with a stale version: 409, value unchanged");
    let r = c
        .put(&url)
        .header("if-match", format!("\"{}\"", v1 + 1000))
        .body(r#"{"n":3}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(
        code(r).await,
        (StatusCode::CONFLICT, "version_conflict".into())
    );
    let r = c
        .delete(format!("{url}?if_version={}", v1 + 1000))
        .send()
        .await
        .unwrap();
    assert_eq!(
        code(r).await,
        (StatusCode::CONFLICT, "version_conflict".into())
    );
    assert_eq!(
        c.get(&url).send().await.unwrap().text().await.unwrap(),
        r#"{"n":1}"#
    );

    phase("the current version (header or query) succeeds");
    let r = c
        .put(format!("{url}?if_version={v1}"))
        .header("if-match", format!("\"{v1}\""))
        .body(r#"{"n":4}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let v2 = r.json::<Value>().await.unwrap()["version"]
        .as_u64()
        .unwrap();

    phase("header and query that disagree are a bad request");
    let r = c
        .put(format!("{url}?if_version={v1}"))
        .header("if-match", format!("\"{v2}\""))
        .body("1")
        .send()
        .await
        .unwrap();
    assert_eq!(
        code(r).await,
        (StatusCode::BAD_REQUEST, "invalid_request".into())
    );

    phase("a transaction with one failed precondition writes nothing");
    let r = c
        .post(n.url("/v1/transactions"))
        .json(&json!({"ops":[
            {"op":"put","table":"acct","key":"other","value":{"x":1}},
            {"op":"put","table":"acct","key":"k","value":{"n":5},"if_version": v1},
        ]}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        code(r).await,
        (StatusCode::CONFLICT, "version_conflict".into())
    );
    let r = c
        .get(n.url("/v1/tables/acct/records/other"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        c.get(&url).send().await.unwrap().text().await.unwrap(),
        r#"{"n":4}"#
    );
    n.stop().await;
}

#[tokio::test]
async fn bad_requests_answer_400_with_a_code() {
    let n = TestNode::start().await;
    let c = &n.client;
    let cases: Vec<(&str, reqwest::RequestBuilder)> = vec![
        (
            "bad JSON",
            c.put(n.url("/v1/tables/t/records/k")).body("{not json"),
        ),
        ("empty body", c.put(n.url("/v1/tables/t/records/k"))),
        (
            "two JSON documents",
            c.put(n.url("/v1/tables/t/records/k")).body("1 2"),
        ),
        (
            "bad table name",
            c.put(n.url("/v1/tables/bad%20table/records/k")).body("1"),
        ),
        (
            "control character in key",
            c.put(n.url("/v1/tables/t/records/a%0Ab")).body("1"),
        ),
        (
            "invalid UTF-8 in key",
            c.put(n.url("/v1/tables/t/records/%FF%FE")).body("1"),
        ),
        (
            "key too long",
            c.get(n.url(&format!("/v1/tables/t/records/{}", "k".repeat(1025)))),
        ),
        (
            "weak If-Match",
            c.put(n.url("/v1/tables/t/records/k"))
                .header("if-match", "W/\"1\"")
                .body("1"),
        ),
        (
            "non-numeric if_version",
            c.put(n.url("/v1/tables/t/records/k?if_version=abc"))
                .body("1"),
        ),
        (
            "session header with a space",
            c.put(n.url("/v1/tables/t/records/k"))
                .header("x-mirrordb-session", "a b")
                .body("1"),
        ),
        (
            "unknown scan parameter",
            c.get(n.url("/v1/tables/t/records?start-after=x")),
        ),
        ("scan limit 0", c.get(n.url("/v1/tables/t/records?limit=0"))),
        (
            "scan limit too large",
            c.get(n.url("/v1/tables/t/records?limit=10001")),
        ),
        (
            "transaction not JSON",
            c.post(n.url("/v1/transactions")).body("["),
        ),
        (
            "transaction empty",
            c.post(n.url("/v1/transactions")).json(&json!({"ops":[]})),
        ),
        (
            "transaction unknown op",
            c.post(n.url("/v1/transactions"))
                .json(&json!({"ops":[{"op":"upsert","table":"t","key":"k","value":1}]})),
        ),
        (
            "transaction put without value",
            c.post(n.url("/v1/transactions"))
                .json(&json!({"ops":[{"op":"put","table":"t","key":"k"}]})),
        ),
        (
            "transaction delete with value",
            c.post(n.url("/v1/transactions"))
                .json(&json!({"ops":[{"op":"delete","table":"t","key":"k","value":1}]})),
        ),
        (
            "transaction unknown field",
            c.post(n.url("/v1/transactions"))
                .json(&json!({"ops":[{"op":"delete","table":"t","key":"k","iff":1}]})),
        ),
        (
            "transaction bad table",
            c.post(n.url("/v1/transactions"))
                .json(&json!({"ops":[{"op":"delete","table":"no/slash","key":"k"}]})),
        ),
        (
            "table options unknown field",
            c.put(n.url("/v1/tables/t"))
                .json(&json!({"journaled":true,"x":1})),
        ),
        (
            "table options wrong type",
            c.put(n.url("/v1/tables/t"))
                .json(&json!({"journaled":"yes"})),
        ),
    ];
    for (what, req) in cases {
        let r = req.send().await.unwrap();
        assert_eq!(
            code(r).await,
            (StatusCode::BAD_REQUEST, "invalid_request".into()),
            "{what}"
        );
    }

    phase("unknown paths and methods answer JSON errors too");
    let r = c.get(n.url("/v2/nothing")).send().await.unwrap();
    assert_eq!(code(r).await, (StatusCode::NOT_FOUND, "not_found".into()));
    let r = c.post(n.url("/v1/tables")).send().await.unwrap();
    assert_eq!(
        code(r).await,
        (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed".into())
    );

    phase("nothing of the refused requests was written");
    let tables: Value = c
        .get(n.url("/v1/tables"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(tables["tables"], json!([]), "{tables}");
    n.stop().await;
}

#[tokio::test]
async fn oversized_bodies_answer_413() {
    let n = TestNode::start_with(NodeOptions {
        max_body_bytes: Some(1 << 20),
        ..Default::default()
    })
    .await;
    let c = &n.client;

    phase("a record body past max_body_bytes (1 MiB here) is refused");
    let big = format!("\"{}\"", "x".repeat(1 << 20));
    let r = c
        .put(n.url("/v1/tables/t/records/k"))
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(
        code(r).await,
        (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large".into())
    );

    phase("a transaction body past max_body_bytes is refused and writes nothing");
    let r = c
        .post(n.url("/v1/transactions"))
        .json(&json!({"ops":[{"op":"put","table":"t","key":"k2","value": big}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        code(r).await,
        (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large".into())
    );
    let r = c
        .get(n.url("/v1/tables/t/records/k2"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    phase("a BLOB declaring more than 1 GiB is refused before its body is read");
    let req = format!(
        "PUT /v1/tables/t/blobs/huge HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        (1u64 << 30) + 1
    );
    let answer = raw_http(n.addr, req.as_bytes(), Duration::from_secs(10))
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("payload_too_large"), "{answer}");
    n.stop().await;

    phase("with the default limit a record value past 16 MiB is refused");
    let n = TestNode::start().await;
    let big = format!("\"{}\"", "x".repeat(16 << 20));
    let r = n
        .client
        .put(n.url("/v1/tables/t/records/k"))
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(
        code(r).await,
        (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large".into())
    );
    n.stop().await;
}

#[tokio::test]
async fn stalled_bodies_answer_408_and_write_nothing() {
    let n = TestNode::start_with(NodeOptions {
        body_idle_timeout: Some(Duration::from_millis(300)),
        ..Default::default()
    })
    .await;
    for (what, path) in [
        ("record", "/v1/tables/t/records/k"),
        ("BLOB", "/v1/tables/t/blobs/b"),
        ("transaction", "/v1/transactions"),
    ] {
        phase(&format!(
            "a {what} body that promises 100 bytes and sends 10, then stalls"
        ));
        let method = if what == "transaction" { "POST" } else { "PUT" };
        let req =
            format!("{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789");
        let answer = raw_http(n.addr, req.as_bytes(), Duration::from_secs(10))
            .await
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 408"), "{what}: {answer}");
        assert!(answer.contains("request_timeout"), "{what}: {answer}");
    }
    phase("nothing was written");
    let t: Value = n
        .client
        .get(n.url("/v1/tables"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(t["tables"], json!([]), "{t}");
    n.stop().await;
}

/// Up to `max` random characters, non-alphanumeric bytes percent-encoded.
fn junk(rng: &mut rand::rngs::StdRng, max: usize) -> String {
    let len = rng.random_range(0..max);
    (0..len)
        .map(|_| {
            let b: u8 = rng.random();
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Random request bytes in paths, headers, queries and bodies give 4xx
/// answers, never a 5xx or a dead server.
#[tokio::test]
async fn random_requests_never_crash_or_500() {
    let n = TestNode::start_with(NodeOptions {
        body_idle_timeout: Some(Duration::from_millis(200)),
        ..Default::default()
    })
    .await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed());
    let methods = ["GET", "PUT", "POST", "DELETE", "PATCH", "HEAD"];
    let paths = [
        "/v1/tables/{s}/records/{s}",
        "/v1/tables/{s}/records?{s}",
        "/v1/tables/{s}/blobs/{s}",
        "/v1/tables/{s}",
        "/v1/transactions",
        "/v1/{s}",
        "/{s}",
    ];
    let headers = [
        "If-Match",
        "If-None-Match",
        "X-Mirrordb-Session",
        "Content-Length",
        "Authorization",
        "Content-Type",
    ];
    let mut statuses = std::collections::BTreeMap::<u16, u32>::new();
    for i in 0..150 {
        let path_t = paths[i % paths.len()];
        let path =
            path_t
                .replacen("{s}", &junk(&mut rng, 40), 1)
                .replacen("{s}", &junk(&mut rng, 40), 1);
        let method = methods[(i / paths.len()) % methods.len()];
        let header = headers[i % headers.len()];
        let value = junk(&mut rng, 20).replace('%', "");
        let body_len = rng.random_range(0..200usize);
        let mut body: Vec<u8> = (0..body_len).map(|_| rng.random()).collect();
        if i % 3 == 0 {
            body = format!(
                r#"{{"ops":[{{"op":"put","table":"t","key":"{value}","value":{}}}]}}"#,
                junk(&mut rng, 5)
            )
            .into_bytes();
        }
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{header}: {value}\r\n"
        )
        .into_bytes();
        if header != "Content-Length" {
            req.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
        }
        req.extend_from_slice(b"\r\n");
        req.extend_from_slice(&body);
        let answer = raw_http(n.addr, &req, Duration::from_secs(5))
            .await
            .unwrap();
        let status: u16 = answer.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
        *statuses.entry(status).or_default() += 1;
        assert!(
            (200..500).contains(&status) || answer.is_empty(),
            "request {i}: {method} {path} {header}: {value}\n=> {answer}"
        );
    }
    eprintln!("statuses: {statuses:?}");
    assert!(
        statuses.get(&0).copied().unwrap_or(0) < 15,
        "too many requests without an answer: {statuses:?}"
    );
    phase("the node still serves");
    let r = n.client.get(n.url("/health")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    n.stop().await;
}

#[tokio::test]
async fn blob_uploads_beyond_the_limit_answer_write_blocked() {
    let n = TestNode::start_with(NodeOptions {
        write_timeout: Some(Duration::from_millis(300)),
        body_idle_timeout: Some(Duration::from_secs(20)),
        ..Default::default()
    })
    .await;
    phase("32 uploads that send a header and a little body, then stall");
    let mut stalled = Vec::new();
    for i in 0..mirrordb::api::MAX_CONCURRENT_BLOB_UPLOADS {
        let mut s = tokio::net::TcpStream::connect(n.addr).await.unwrap();
        let req = format!(
            "PUT /v1/tables/t/blobs/b{i} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0123"
        );
        tokio::io::AsyncWriteExt::write_all(&mut s, req.as_bytes())
            .await
            .unwrap();
        stalled.push(s);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    phase("one more waits write_timeout for a slot, then answers write_blocked");
    let r = n
        .client
        .put(n.url("/v1/tables/t/blobs/extra"))
        .body(vec![1u8; 10])
        .send()
        .await
        .unwrap();
    assert_eq!(
        code(r).await,
        (StatusCode::SERVICE_UNAVAILABLE, "write_blocked".into())
    );
    phase("records are not held back by BLOB uploads; freed slots are reused");
    let r = n
        .client
        .put(n.url("/v1/tables/t/records/k"))
        .body("1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    drop(stalled);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = n
        .client
        .put(n.url("/v1/tables/t/blobs/extra"))
        .body(vec![1u8; 10])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    n.stop().await;
}

#[tokio::test]
async fn scans_are_ordered_and_paged() {
    let n = TestNode::start().await;
    let c = &n.client;

    phase("25 records under prefix p/, 5 elsewhere, written in a scrambled order");
    let mut keys: Vec<String> = (0..25).map(|i| format!("p/{i:03}")).collect();
    keys.extend((0..5).map(|i| format!("q/{i}")));
    let mut order = keys.clone();
    order.reverse();
    order.swap(3, 17);
    for k in &order {
        let r = c
            .put(n.url(&format!("/v1/tables/s/records/{k}")))
            .json(&json!({"k": k}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }

    phase("pages of 10 cover the prefix exactly once, in order; next is null at the end");
    let mut seen = Vec::new();
    let mut start_after: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut q = vec![("prefix", "p/".to_owned()), ("limit", "10".to_owned())];
        if let Some(s) = &start_after {
            q.push(("start_after", s.clone()));
        }
        let page: Value = c
            .get(n.url(&format!("/v1/tables/s/records?{}", query(&q))))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        pages += 1;
        for r in page["records"].as_array().unwrap() {
            let k = r["key"].as_str().unwrap().to_owned();
            assert_eq!(r["value"], json!({"k": k}));
            assert!(r["version"].as_u64().unwrap() > 0);
            seen.push(k);
        }
        match page["next"].as_str() {
            Some(next) => start_after = Some(next.to_owned()),
            None => break,
        }
        assert!(pages < 10, "paging does not end");
    }
    assert_eq!(seen, keys[..25].to_vec());

    phase("without a prefix the whole table is listed; the default limit is 100");
    let page: Value = c
        .get(n.url("/v1/tables/s/records"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page["records"].as_array().unwrap().len(), 30);
    assert_eq!(page["next"], Value::Null);

    phase("a table that does not exist scans empty");
    let r = c
        .get(n.url("/v1/tables/none/records"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let page: Value = r.json().await.unwrap();
    assert_eq!(page["records"], json!([]));
    n.stop().await;
}

#[tokio::test]
async fn transactions_apply_atomically() {
    let n = TestNode::start().await;
    let c = &n.client;
    c.put(n.url("/v1/tables/t/records/gone"))
        .body("true")
        .send()
        .await
        .unwrap();

    phase("puts and a delete in one transaction: one LSN, a version per op");
    let r = c
        .post(n.url("/v1/transactions"))
        .json(&json!({"ops":[
            {"op":"put","table":"t","key":"a","value":{"v":1}},
            {"op":"put","table":"u","key":"b","value":null},
            {"op":"delete","table":"t","key":"gone"},
        ]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let ack: Value = r.json().await.unwrap();
    assert_eq!(ack["versions"].as_array().unwrap().len(), 3, "{ack}");
    assert!(ack["lsn"].as_u64().unwrap() > 0);
    let get = |k: &str| c.get(n.url(k)).send();
    assert_eq!(
        get("/v1/tables/t/records/a")
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        r#"{"v":1}"#
    );
    assert_eq!(
        get("/v1/tables/u/records/b")
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        "null"
    );
    assert_eq!(
        get("/v1/tables/t/records/gone").await.unwrap().status(),
        StatusCode::NOT_FOUND
    );

    phase("values in a transaction are stored byte-exact (no reordering, no float rounding)");
    let body = r#"{"ops":[{"op":"put","table":"t","key":"exact","value":{"z":1, "a":12345678901234567890123}}]}"#;
    let r = c
        .post(n.url("/v1/transactions"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        get("/v1/tables/t/records/exact")
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        r#"{"z":1, "a":12345678901234567890123}"#
    );
    n.stop().await;
}

#[tokio::test]
async fn blobs_stream_byte_exact() {
    let n = TestNode::start().await;
    let c = &n.client;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed());

    phase("several MiB of random bytes (not a multiple of the chunk size) round-trip");
    let mut data = vec![0u8; 5 * 1024 * 1024 + 12_345];
    rng.fill(&mut data[..]);
    let r = c
        .put(n.url("/v1/tables/files/blobs/img/1.bin"))
        .header("content-type", "application/octet-stream")
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let ack: Value = r.json().await.unwrap();
    let version = ack["version"].as_u64().unwrap();
    assert_eq!(ack["size"], data.len(), "{ack}");
    let r = c
        .get(n.url("/v1/tables/files/blobs/img/1.bin"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "application/octet-stream");
    assert_eq!(r.headers()["etag"], format!("\"{version}\"").as_str());
    assert_eq!(r.content_length(), Some(data.len() as u64));
    let got = r.bytes().await.unwrap();
    assert!(got[..] == data[..], "BLOB bytes differ");

    phase("a streamed (chunked, no Content-Length) upload works too; empty BLOBs are fine");
    let mut req = b"PUT /v1/tables/files/blobs/streamed HTTP/1.1\r\nHost: x\r\n\
        Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        .to_vec();
    for chunk in data.chunks(300_000) {
        req.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        req.extend_from_slice(chunk);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let answer = raw_http(n.addr, &req, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.contains(&format!("\"size\":{}", data.len())),
        "{answer}"
    );
    let got = c
        .get(n.url("/v1/tables/files/blobs/streamed"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(got[..] == data[..], "streamed BLOB bytes differ");
    let r = c
        .put(n.url("/v1/tables/files/blobs/empty"))
        .body(Vec::new())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = c
        .get(n.url("/v1/tables/files/blobs/empty"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.bytes().await.unwrap().is_empty());

    phase("tables list counts BLOBs; delete removes one");
    let tables: Value = c
        .get(n.url("/v1/tables"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let files = tables["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "files")
        .unwrap();
    assert_eq!(files["blobs"], 3, "{tables}");
    let r = c
        .delete(n.url("/v1/tables/files/blobs/img/1.bin"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = c
        .get(n.url("/v1/tables/files/blobs/img/1.bin"))
        .send()
        .await
        .unwrap();
    assert_eq!(code(r).await, (StatusCode::NOT_FOUND, "not_found".into()));
    n.stop().await;
}

#[tokio::test]
async fn table_options_are_set_and_listed() {
    let n = TestNode::start().await;
    let c = &n.client;

    phase("PUT /v1/tables/{table} creates a table with its options");
    let r = c
        .put(n.url("/v1/tables/scratch"))
        .json(&json!({"journaled": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let ack: Value = r.json().await.unwrap();
    assert_eq!(ack["journaled"], false);
    c.put(n.url("/v1/tables/main/records/k"))
        .body("1")
        .send()
        .await
        .unwrap();

    phase("GET /v1/tables lists both with options and counts");
    let tables: Value = c
        .get(n.url("/v1/tables"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let find = |name: &str| {
        tables["tables"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} missing from {tables}"))
    };
    assert_eq!(find("scratch")["journaled"], false);
    assert_eq!(find("main")["journaled"], true);
    assert_eq!(find("main")["records"], 1);

    phase("options can be changed back");
    let r = c
        .put(n.url("/v1/tables/scratch"))
        .json(&json!({"journaled": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let tables: Value = c
        .get(n.url("/v1/tables"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        tables["tables"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["name"] == "scratch" && t["journaled"] == true),
        "{tables}"
    );
    n.stop().await;
}

#[tokio::test]
async fn tokens_and_roles_are_enforced() {
    let n = TestNode::start_with(NodeOptions::default().with_role_tokens()).await;
    let c = &n.client;
    let rec = n.url("/v1/tables/t/records/k");

    phase("no token: 401 with WWW-Authenticate, on reads and writes");
    let r = c.get(&rec).send().await.unwrap();
    assert!(r.headers().contains_key("www-authenticate"));
    assert_eq!(
        code(r).await,
        (StatusCode::UNAUTHORIZED, "unauthorized".into())
    );
    let r = c.put(&rec).body("1").send().await.unwrap();
    assert_eq!(
        code(r).await,
        (StatusCode::UNAUTHORIZED, "unauthorized".into())
    );
    let r = c.get(n.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    phase("unknown token or another scheme: 401");
    let r = c
        .get(&rec)
        .bearer_auth("not-a-token-at-all")
        .send()
        .await
        .unwrap();
    assert_eq!(
        code(r).await,
        (StatusCode::UNAUTHORIZED, "unauthorized".into())
    );
    let r = c
        .get(&rec)
        .basic_auth("reader", Some(READ_TOKEN))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    phase("read token: reads yes, writes 403 and nothing written");
    for (what, req) in [
        ("put", c.put(&rec).body("1")),
        ("delete", c.delete(&rec)),
        ("blob", c.put(n.url("/v1/tables/t/blobs/b")).body("x")),
        (
            "table",
            c.put(n.url("/v1/tables/t"))
                .json(&json!({"journaled":true})),
        ),
        (
            "txn",
            c.post(n.url("/v1/transactions"))
                .json(&json!({"ops":[{"op":"delete","table":"t","key":"k"}]})),
        ),
    ] {
        let r = req.bearer_auth(READ_TOKEN).send().await.unwrap();
        assert_eq!(
            code(r).await,
            (StatusCode::FORBIDDEN, "forbidden".into()),
            "{what}"
        );
    }
    let r = c.get(&rec).bearer_auth(READ_TOKEN).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = c
        .get(n.url("/v1/status"))
        .bearer_auth(READ_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = c
        .get(n.url("/metrics"))
        .bearer_auth(READ_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    phase("write token writes; admin token writes; write token cannot reach admin paths");
    let r = c
        .put(&rec)
        .bearer_auth(WRITE_TOKEN)
        .body("1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = c
        .put(&rec)
        .bearer_auth(ADMIN_TOKEN)
        .body("2")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = c
        .post(n.url("/v1/journal/rotate"))
        .bearer_auth(WRITE_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(code(r).await, (StatusCode::FORBIDDEN, "forbidden".into()));
    let r = c.get(&rec).bearer_auth(READ_TOKEN).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "2");

    phase("/health needs no token (liveness probes)");
    let r = c.get(n.url("/health")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    n.stop().await;
}

#[tokio::test]
async fn health_status_and_metrics() {
    let n = TestNode::start_with(NodeOptions {
        configure: Some(Arc::new(|c: &mut Config| {
            c.node.name = "status-node".into()
        })),
        ..Default::default()
    })
    .await;
    let c = &n.client;
    c.put(n.url("/v1/tables/m/records/k"))
        .header("x-mirrordb-session", "worker-7")
        .body("1")
        .send()
        .await
        .unwrap();

    phase("/health: 200 with journal availability");
    let r = c.get(n.url("/health")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let h: Value = r.json().await.unwrap();
    assert_eq!(h["status"], "ok");
    assert_eq!(h["journal_available"], true);
    assert!(h["last_lsn"].as_u64().unwrap() > 0);

    phase("/v1/status: engine positions and the recovery report");
    let s: Value = c
        .get(n.url("/v1/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(s["node"], "status-node");
    assert_eq!(s["role"], "primary", "{s}");
    assert!(
        s["engine"]["db_id"].as_str().is_some_and(|d| !d.is_empty()),
        "{s}"
    );
    assert!(s["engine"]["durable_lsn"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(s["engine"]["journal_available"], true);
    assert_eq!(s["recovery"]["action"], "created", "{s}");

    phase("/metrics: Prometheus text with the engine's and the API's metrics");
    let r = c.get(n.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = r.text().await.unwrap();
    for name in [
        "mirrordb_writes_total",
        "mirrordb_write_batches_total",
        "mirrordb_journal_bytes_total",
        "mirrordb_fsync_seconds",
        "mirrordb_last_lsn",
        "mirrordb_journal_available",
        "mirrordb_data_file_bytes",
        "mirrordb_http_requests_total",
        "mirrordb_http_request_seconds",
    ] {
        assert!(text.contains(name), "/metrics lacks {name}:\n{text}");
    }
    assert!(
        text.contains(r#"route="/v1/tables/{table}/records/{*key}""#),
        "HTTP metrics are labelled by route:\n{text}"
    );
    n.stop().await;
}

#[tokio::test]
async fn journal_failure_refuses_writes_with_503_and_keeps_reads() {
    let disk = Arc::new(FaultyDisk::new());
    let n = TestNode::start_with(NodeOptions {
        disk: Some(disk.clone()),
        ..Default::default()
    })
    .await;
    let c = &n.client;
    let r = c
        .put(n.url("/v1/tables/t/records/before"))
        .body("1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    phase("an fsync fails: the write is refused with journal_unavailable");
    disk.plan(|p| p.fail_next_sync = true);
    let r = c
        .put(n.url("/v1/tables/t/records/after"))
        .body("2")
        .send()
        .await
        .unwrap();
    assert_eq!(
        code(r).await,
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "journal_unavailable".into()
        )
    );
    let r = c
        .put(n.url("/v1/tables/t/records/later"))
        .body("3")
        .send()
        .await
        .unwrap();
    assert_eq!(
        code(r).await,
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "journal_unavailable".into()
        )
    );

    phase("reads go on; /health is 200 and says the journal is unavailable");
    let r = c
        .get(n.url("/v1/tables/t/records/before"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let h: Value = c
        .get(n.url("/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(h["journal_available"], false, "{h}");
    assert!(h["journal_error"].as_str().is_some(), "{h}");
}

#[tokio::test]
async fn a_mirror_refuses_writes_with_not_primary() {
    let n = TestNode::start().await;
    let c = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = c.get(n.url("/primary")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    phase("a mirror that knows its primary redirects writes (307) to the same path there");
    n.engine()
        .set_role(Role::Mirror {
            primary_http: Some("http://primary.example:7070".into()),
        })
        .await
        .unwrap();
    let r = c
        .put(n.url("/v1/tables/t/records/k?if_version=0"))
        .body("1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::TEMPORARY_REDIRECT);
    assert_eq!(
        r.headers()["location"],
        "http://primary.example:7070/v1/tables/t/records/k?if_version=0"
    );
    assert_eq!(code(r).await.1, "not_primary");

    phase("without a known primary: 503 not_primary; reads still served; /primary is 503");
    n.engine()
        .set_role(Role::Mirror { primary_http: None })
        .await
        .unwrap();
    let r = c
        .post(n.url("/v1/transactions"))
        .json(&json!({"ops":[{"op":"delete","table":"t","key":"k"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        code(r).await,
        (StatusCode::SERVICE_UNAVAILABLE, "not_primary".into())
    );
    let r = c.get(n.url("/v1/tables/t/records/k")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = c.get(n.url("/primary")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let h: Value = c
        .get(n.url("/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(h["role"], "mirror", "{h}");
    n.stop().await;
}

#[tokio::test]
async fn activity_lock_and_rotation_paths() {
    let n = TestNode::start_with(NodeOptions {
        write_timeout: Some(Duration::from_millis(300)),
        ..NodeOptions::default().with_role_tokens()
    })
    .await;
    let c = &n.client;

    phase("a write under a client session is journaled with its identity");
    let r = c
        .put(n.url("/v1/tables/t/records/k1"))
        .bearer_auth(WRITE_TOKEN)
        .header("x-mirrordb-session", "import-42")
        .body("1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let lsn = r.json::<Value>().await.unwrap()["lsn"].as_u64().unwrap();
    let act: Value = c
        .get(n.url("/v1/journal?table=t&key=k1"))
        .bearer_auth(READ_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let put = act["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["op"] == "put")
        .unwrap_or_else(|| panic!("no put in {act}"));
    assert_eq!(put["lsn"], lsn, "{act}");
    assert_eq!(put["identity"]["token_name"], "writer", "{act}");
    assert_eq!(put["identity"]["client_session"], "import-42", "{act}");
    assert_eq!(put["identity"]["peer"], "127.0.0.1", "{act}");
    for bad in [
        "/v1/journal?limit=0",
        "/v1/journal?since=yesterday",
        "/v1/journal?x=1",
    ] {
        let r = c
            .get(n.url(bad))
            .bearer_auth(READ_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(
            code(r).await,
            (StatusCode::BAD_REQUEST, "invalid_request".into()),
            "{bad}"
        );
    }

    phase(
        "flush-and-lock needs admin; while held, writes answer write_blocked and are not applied",
    );
    let r = c
        .post(n.url("/v1/lock"))
        .bearer_auth(WRITE_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(code(r).await, (StatusCode::FORBIDDEN, "forbidden".into()));
    let r = c
        .post(n.url("/v1/lock"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"lease": "0s"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        code(r).await,
        (StatusCode::BAD_REQUEST, "invalid_request".into())
    );
    let r = c
        .post(n.url("/v1/lock"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"lease": "30s"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let l: Value = r.json().await.unwrap();
    assert_eq!(
        (l["locked"].clone(), l["owner"].clone()),
        (json!(true), json!("admin")),
        "{l}"
    );
    let l: Value = c
        .get(n.url("/v1/lock"))
        .bearer_auth(READ_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(l["locked"], true, "{l}");
    let r = c
        .put(n.url("/v1/tables/t/records/held"))
        .bearer_auth(WRITE_TOKEN)
        .body("2")
        .send()
        .await
        .unwrap();
    assert_eq!(
        code(r).await,
        (StatusCode::SERVICE_UNAVAILABLE, "write_blocked".into())
    );

    phase("unlock: writes flow again, and the blocked write never appears");
    let r = c
        .delete(n.url("/v1/lock"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap()["locked"], false);
    let r = c
        .put(n.url("/v1/tables/t/records/after"))
        .bearer_auth(WRITE_TOKEN)
        .body("3")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = c
        .get(n.url("/v1/tables/t/records/held"))
        .bearer_auth(READ_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    phase("the CLI's lock, unlock and journal rotate call the same paths");
    let cli = |args: Vec<String>| async move {
        tokio::task::spawn_blocking(move || {
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            run_mirrordb(&a).unwrap()
        })
        .await
        .unwrap()
    };
    let args = |cmd: &[&str], token: &str| -> Vec<String> {
        let mut v: Vec<String> = cmd.iter().map(|s| s.to_string()).collect();
        v.extend([
            "--url".into(),
            n.base.clone(),
            "--token".into(),
            token.into(),
        ]);
        v
    };
    let (st, _, err) = cli(args(&["lock", "--lease", "10s"], WRITE_TOKEN)).await;
    assert_eq!(st.code(), Some(1), "{err}");
    assert!(err.contains("needs role admin"), "{err}");
    let (st, out, err) = cli(args(
        &["lock", "--owner", "snap", "--lease", "10s"],
        ADMIN_TOKEN,
    ))
    .await;
    assert!(st.success(), "{err}");
    assert!(out.starts_with("locked by snap (depth 1"), "{out}");
    // Re-entrant, and --json prints the node's answer itself.
    let (st, out, err) = cli(args(
        &["lock", "--owner", "snap", "--lease", "10s", "--json"],
        ADMIN_TOKEN,
    ))
    .await;
    assert!(st.success(), "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (&v["owner"], &v["depth"]),
        (&json!("snap"), &json!(2)),
        "{out}"
    );
    let (st, out, err) = cli(args(&["unlock", "--owner", "snap"], ADMIN_TOKEN)).await;
    assert!(st.success(), "{err}");
    assert!(out.starts_with("locked by snap (depth 1"), "{out}");
    let (st, out, err) = cli(args(&["unlock", "--owner", "snap", "--json"], ADMIN_TOKEN)).await;
    assert!(st.success(), "{err}");
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["locked"],
        false,
        "{out}"
    );
    // A standalone node has no cluster to show or switch over.
    for cmd in [&["cluster", "status"][..], &["switchover"][..]] {
        let (st, _, err) = cli(args(cmd, ADMIN_TOKEN)).await;
        assert_eq!(st.code(), Some(1), "{cmd:?}: {err}");
        assert!(err.contains("runs standalone"), "{cmd:?}: {err}");
    }
    let (st, out, err) = cli(args(&["journal", "rotate"], ADMIN_TOKEN)).await;
    assert!(st.success(), "{err}");
    assert!(
        out.starts_with("closed ") && out.contains("(last LSN "),
        "{out}"
    );

    phase("journal rotation (admin) closes the open segment");
    let r = c
        .put(n.url("/v1/tables/t/records/after-rotate"))
        .bearer_auth(WRITE_TOKEN)
        .body("4")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = c
        .post(n.url("/v1/journal/rotate"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let rot: Value = r.json().await.unwrap();
    assert!(rot["closed"].as_str().is_some(), "{rot}");
    assert!(rot["last_lsn"].as_u64().unwrap() >= lsn, "{rot}");
    n.stop().await;
}

#[tokio::test]
async fn listening_beyond_loopback_without_tokens_is_refused() {
    phase("in process: serve::start refuses 0.0.0.0 without tokens");
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::default();
    cfg.node.data_dir = dir.path().to_owned();
    cfg.node.listen = "0.0.0.0:0".parse().unwrap();
    let engine = mirrordb::serve::open_engine(mirrordb::serve::engine_config(&cfg))
        .await
        .unwrap();
    let err = mirrordb::serve::start(&cfg, engine.clone())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("refusing to listen on 0.0.0.0:0"), "{err}");
    engine.shutdown().await.unwrap();

    phase("the binary exits with status 2 and says why, before opening the data");
    let data = dir.path().join("bin-data");
    let (status, _out, errout) = run_mirrordb(&[
        "serve",
        "--data-dir",
        data.to_str().unwrap(),
        "--listen",
        "0.0.0.0:0",
    ])
    .unwrap();
    assert_eq!(status.code(), Some(2), "{errout}");
    assert!(errout.contains("without authentication"), "{errout}");
    assert!(!data.exists(), "the data directory must not be created");
}

#[tokio::test]
async fn config_errors_stop_the_binary_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.toml");
    std::fs::write(&path, "[cache]\nflush_intervall = \"1s\"\n").unwrap();
    let (status, _, errout) = run_mirrordb(&["serve", "--config", path.to_str().unwrap()]).unwrap();
    assert_eq!(status.code(), Some(2), "{errout}");
    assert!(errout.contains("flush_intervall"), "{errout}");
    std::fs::write(&path, "[api]\nwrite_timeout = \"soon\"\n").unwrap();
    let (status, _, errout) =
        run_mirrordb(&["config", "check", "--config", path.to_str().unwrap()]).unwrap();
    assert_eq!(status.code(), Some(2), "{errout}");
    assert!(errout.contains("write_timeout"), "{errout}");
    let (status, out, _) = run_mirrordb(&["config", "defaults"]).unwrap();
    assert!(status.success());
    assert!(out.contains("flush_interval = \"1s\""), "{out}");

    phase("config check prints the resolved file with secrets redacted");
    std::fs::write(
        &path,
        "[node]\nlisten = \"0.0.0.0:7070\"\n[[api.tokens]]\nname = \"app\"\ntoken = \"super-secret-token-value\"\nrole = \"write\"\n",
    )
    .unwrap();
    let (status, out, errout) = run_mirrordb(&[
        "config",
        "check",
        "--config",
        path.to_str().unwrap(),
        "--json",
    ])
    .unwrap();
    assert!(status.success(), "{errout}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["node"]["listen"], "0.0.0.0:7070");
    assert_eq!(v["api"]["tokens"][0]["token"], "<redacted>");
    assert!(!out.contains("super-secret-token-value"));
}

#[tokio::test]
async fn healthcheck_reaches_a_node_over_its_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let cfg = dir.path().join("node.toml");
    std::fs::write(
        &cfg,
        format!("[api]\nunix_socket = {:?}\n", sock.to_str().unwrap()),
    )
    .unwrap();
    let node = ChildNode::spawn_with(
        &dir.path().join("data"),
        &["--config", cfg.to_str().unwrap()],
    )
    .unwrap();
    let url = format!("unix:{}", sock.display());

    phase("healthcheck over the socket: exit 0 and the node's answer");
    let (status, out, err) = run_mirrordb(&["healthcheck", "--url", &url, "--json"]).unwrap();
    assert!(status.success(), "{out}{err}");
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["status"], "ok");

    phase("--path /primary: the role probe, which a standalone node passes");
    let (status, out, err) =
        run_mirrordb(&["healthcheck", "--url", &url, "--path", "/primary", "--json"]).unwrap();
    assert!(status.success(), "{out}{err}");
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["primary"],
        true,
        "{out}"
    );
    let (status, out, err) =
        run_mirrordb(&["healthcheck", "--url", &url, "--path", "/v1/nothing"]).unwrap();
    assert_eq!(status.code(), Some(1), "a 404 is unhealthy: {out}{err}");

    phase("node stopped, socket removed: exit 1, saying why");
    let status = node.terminate().unwrap();
    assert!(status.success(), "{status}");
    let (status, out, err) =
        run_mirrordb(&["healthcheck", "--url", &url, "--timeout", "500ms"]).unwrap();
    assert_eq!(status.code(), Some(1), "{out}{err}");
    assert!(err.contains("unhealthy"), "{err}");

    phase("a URL it cannot use: exit 1 with the reason");
    let (status, out, err) =
        run_mirrordb(&["healthcheck", "--url", "https://127.0.0.1:1", "--json"]).unwrap();
    assert_eq!(status.code(), Some(1), "{out}{err}");
    assert!(out.contains("plain http://"), "{out}");
}

#[tokio::test]
async fn child_process_serves_stops_cleanly_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");

    phase("spawn the binary; write through HTTP; healthcheck passes");
    let node = ChildNode::spawn(&data).unwrap();
    let c = reqwest::Client::new();
    let r = c
        .put(node.url("/v1/tables/t/records/k"))
        .body(r#"{"kept":true}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(node.recovery_report().unwrap()["action"], "created");
    let (status, out, _) = run_mirrordb(&["healthcheck", "--url", &node.base, "--json"]).unwrap();
    assert!(status.success(), "{out}");
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["status"], "ok");
    // A fragment is not sent and swallows the /health appended after it.
    let fragment = format!("{}/primary#", node.base);
    let (status, out, _) = run_mirrordb(&["healthcheck", "--url", &fragment, "--json"]).unwrap();
    assert!(status.success(), "{out}");
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["primary"],
        true,
        "{out}"
    );

    phase("SIGTERM: clean exit 0");
    let base = node.base.clone();
    let status = node.terminate().unwrap();
    assert!(status.success(), "{status}");
    let (status, _, _) =
        run_mirrordb(&["healthcheck", "--url", &base, "--timeout", "500ms"]).unwrap();
    assert_eq!(
        status.code(),
        Some(1),
        "healthcheck of a stopped node fails"
    );

    phase("restart on the same data: opened without replay, the record is there");
    let node = ChildNode::spawn(&data).unwrap();
    let report = node.recovery_report().unwrap();
    assert_eq!(report["action"], "opened", "{report}");
    let got = c
        .get(node.url("/v1/tables/t/records/k"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(got, r#"{"kept":true}"#);

    phase("a second node on the same data directory refuses to start, saying why");
    let (status, _, errout) = run_mirrordb(&[
        "serve",
        "--data-dir",
        data.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ])
    .unwrap();
    assert_eq!(status.code(), Some(1), "{errout}");
    assert!(
        errout.contains("in use by another mirrordb process"),
        "{errout}"
    );

    phase("SIGKILL, restart: the acknowledged write survives");
    node.kill().unwrap();
    let node = ChildNode::spawn(&data).unwrap();
    let got = c
        .get(node.url("/v1/tables/t/records/k"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(got, r#"{"kept":true}"#);
    node.terminate().unwrap();
}
