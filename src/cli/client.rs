//! The shared HTTP client of every CLI command: the server's URL, the bearer token, one request per call,
//! and the answer sorted into success, a refusal (4xx) or no answer to trust (transport failure, 5xx).
//!
//! Plain HTTP/1.1 through `reqwest` built without TLS: shopkeep speaks plain HTTP (a TLS proxy in front of
//! it is the operator's choice), and reqwest is already the test suite's client.

use std::error::Error as _;
use std::time::Duration;

use reqwest::{Method, RequestBuilder, Url};
use serde_json::Value;

use crate::cli::error::CliError;

/// How long a connection may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The overall limit of a streamed answer (a day: in effect none; stalls are the caller's to bound).
const STREAM_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// A bearer token and where to send requests.
pub struct Client {
    http: reqwest::Client,
    base: Url,
    token: String,
}

/// A 2xx answer: the body as sent (printed as is by `--json`) and parsed.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub raw: Vec<u8>,
    pub json: Value,
    /// `Idempotent-Replayed: true`: the stored outcome of an earlier request with the same key.
    pub replayed: bool,
}

impl Client {
    pub fn new(base: Url, token: String, timeout: Duration) -> Result<Client, CliError> {
        let http = reqwest::Client::builder()
            .http1_only()
            .no_proxy()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(timeout)
            .build()
            .map_err(|e| CliError::BadUrl {
                url: base.to_string(),
                reason: format!("cannot build an HTTP client: {e}"),
            })?;
        Ok(Client { http, base, token })
    }

    /// `base` + the path segments (each percent-encoded) + the query pairs.
    pub fn url(&self, segments: &[&str], query: &[(&str, &str)]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        url
    }

    pub async fn get(&self, segments: &[&str], query: &[(&str, &str)]) -> Result<Answer, CliError> {
        let request = self.request(Method::GET, self.url(segments, query));
        send(request, None).await
    }

    /// A `GET` that may take longer than the client's timeout (one shard's audit): `timeout` instead.
    pub async fn get_within(
        &self,
        segments: &[&str],
        query: &[(&str, &str)],
        timeout: Duration,
    ) -> Result<Answer, CliError> {
        let request = self
            .request(Method::GET, self.url(segments, query))
            .timeout(timeout);
        send(request, None).await
    }

    /// A `PUT` (idempotent by itself: no key).
    pub async fn put(&self, segments: &[&str], body: &Value) -> Result<Answer, CliError> {
        let request = self
            .request(Method::PUT, self.url(segments, &[]))
            .json(body);
        send(request, None).await
    }

    /// A `DELETE` (idempotent by itself: no key).
    pub async fn delete(&self, segments: &[&str]) -> Result<Answer, CliError> {
        let request = self.request(Method::DELETE, self.url(segments, &[]));
        send(request, None).await
    }

    /// A `POST` with its `Idempotency-Key`, which an unknown outcome's error names for the retry.
    pub async fn post(
        &self,
        segments: &[&str],
        body: &Value,
        key: &str,
    ) -> Result<Answer, CliError> {
        let request = self
            .request(Method::POST, self.url(segments, &[]))
            .header("Idempotency-Key", key)
            .json(body);
        send(request, Some(key)).await
    }

    /// A `GET` without a token whose every HTTP answer is returned (e.g. `/readyz`'s 503): only a
    /// transport failure is an error.
    pub async fn probe(&self, segments: &[&str]) -> Result<(u16, Value), CliError> {
        let url = self.url(segments, &[]);
        let response = self
            .http
            .get(url.clone())
            .send()
            .await
            .map_err(|e| transport_error(&e, None))?;
        let status = response.status().as_u16();
        let raw = response
            .bytes()
            .await
            .map_err(|e| transport_error(&e, None))?;
        Ok((status, serde_json::from_slice(&raw).unwrap_or(Value::Null)))
    }

    /// A `GET` whose 2xx body is read by the caller as it streams (a backup's export): no overall
    /// time limit, since it lasts as long as the data takes (the caller bounds the wait per chunk).
    pub async fn get_stream(&self, segments: &[&str]) -> Result<reqwest::Response, CliError> {
        let request = self
            .request(Method::GET, self.url(segments, &[]))
            .timeout(STREAM_TIMEOUT);
        let response = request
            .send()
            .await
            .map_err(|e| transport_error(&e, None))?;
        if response.status().is_success() {
            return Ok(response);
        }
        match read_answer(response, None).await {
            Err(refused) => Err(refused),
            Ok(answer) => Err(CliError::NoAnswer {
                code: "bad_answer".to_owned(),
                detail: format!("the server answered {} to a stream request", answer.status),
                key: None,
            }),
        }
    }

    fn request(&self, method: Method, url: Url) -> RequestBuilder {
        self.http.request(method, url).bearer_auth(&self.token)
    }
}

/// Sends one request; `key` is the idempotency key of a write.
async fn send(request: RequestBuilder, key: Option<&str>) -> Result<Answer, CliError> {
    let response = request.send().await.map_err(|e| transport_error(&e, key))?;
    read_answer(response, key).await
}

/// Reads a whole answer and sorts it (see the module docs).
async fn read_answer(response: reqwest::Response, key: Option<&str>) -> Result<Answer, CliError> {
    let status = response.status().as_u16();
    let replayed = response
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
    let raw = response
        .bytes()
        .await
        .map_err(|e| transport_error(&e, key))?
        .to_vec();
    let json: Option<Value> = serde_json::from_slice(&raw).ok();
    match (status, json) {
        (200..=299, Some(json)) => Ok(Answer {
            status,
            raw,
            json,
            replayed,
        }),
        (400..=499, Some(json)) if error_code(&json).is_some() => Err(refusal(status, &json)),
        (500..=599, json) => Err(server_error(status, json.as_ref(), key)),
        (status, _) => Err(CliError::NoAnswer {
            code: "bad_answer".to_owned(),
            detail: format!(
                "the server answered {status} with no API JSON (is --url a shopkeep server?)"
            ),
            key: key.map(str::to_owned),
        }),
    }
}

/// A 5xx: the server could not do it now, and a write may or may not have taken effect.
fn server_error(status: u16, json: Option<&Value>, key: Option<&str>) -> CliError {
    CliError::NoAnswer {
        code: json
            .and_then(error_code)
            .unwrap_or("server_error")
            .to_owned(),
        detail: format!(
            "the server answered {status}: {}",
            json.and_then(error_message).unwrap_or("no error message")
        ),
        key: key.map(str::to_owned),
    }
}

fn refusal(status: u16, json: &Value) -> CliError {
    CliError::Refused {
        status,
        code: error_code(json).unwrap_or("unknown").to_owned(),
        message: error_message(json).unwrap_or("").to_owned(),
    }
}

fn error_code(json: &Value) -> Option<&str> {
    json.pointer("/error/code").and_then(Value::as_str)
}

fn error_message(json: &Value) -> Option<&str> {
    json.pointer("/error/message").and_then(Value::as_str)
}

/// A connection that could not be made sent nothing; any other failure (timeout, dropped connection)
/// leaves a write's outcome unknown.
fn transport_error(error: &reqwest::Error, key: Option<&str>) -> CliError {
    let url = error.url().map(Url::to_string).unwrap_or_default();
    if error.is_connect() {
        return CliError::Unreachable {
            url,
            detail: error
                .source()
                .map_or_else(|| error.to_string(), source_chain),
        };
    }
    let code = if error.is_timeout() {
        "timeout"
    } else {
        "no_answer"
    };
    CliError::NoAnswer {
        code: code.to_owned(),
        detail: format!("{url}: {}", source_chain(error)),
        key: key.map(str::to_owned),
    }
}

/// The error and its causes, `: `-separated (reqwest's own message alone says little).
fn source_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        text.push_str(": ");
        text.push_str(&e.to_string());
        cause = e.source();
    }
    text
}
