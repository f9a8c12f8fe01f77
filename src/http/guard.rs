//! Browser defences for the admin interface: cross-site request forgery,
//! DNS rebinding, and the headers that keep the status page from being
//! framed, sniffed or made to run injected script.
//!
//! Input: every request, before routing. Output: the request passed on, or
//! `403 {"error": ...}` with a warning in the log; every response, ours or
//! a handler's, leaves with [`SECURITY_HEADERS`].
//!
//! Invariants:
//! - A state-changing request (any method but GET and HEAD) runs only with
//!   the configured bearer token, or with proof that it comes from the
//!   node's own page: `Origin` equal to the origin the request's `Host`
//!   names, and `Sec-Fetch-Site` `same-origin` or `none`, each checked when
//!   present. A request with neither header comes from no browser (browsers
//!   send `Origin` on every cross-origin POST), so it is no forgery and runs.
//! - Without a token (loopback only, config validation sees to that), every
//!   request but health and readiness must name a loopback host: a page on
//!   an attacker's domain that re-resolves to 127.0.0.1 is then same-origin
//!   with itself, and only the `Host` header gives it away.
//! - No CORS header is ever sent, so no other origin can read an answer or
//!   attach the `Authorization` header (that needs a preflight we refuse).

use std::net::IpAddr;
use std::str::FromStr;

use axum::extract::{Request, State};
use axum::http::uri::{Authority, Uri};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::Shared;

/// The page loads only its own script, style and images; the overlay
/// thumbnails are `blob:` URLs made from fetched PNGs. No inline script or
/// style, no plugins, no framing.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
     img-src 'self' blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; \
     frame-ancestors 'none'";

/// Sent on every response.
pub const SECURITY_HEADERS: [(&str, &str); 6] = [
    ("content-security-policy", CONTENT_SECURITY_POLICY),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    // frame-ancestors for browsers that predate it
    ("x-frame-options", "DENY"),
    // other sites cannot even embed our overlay images or JSON
    ("cross-origin-resource-policy", "same-origin"),
    ("cross-origin-opener-policy", "same-origin"),
];

pub async fn security_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    for (name, value) in SECURITY_HEADERS {
        h.insert(HeaderName::from_static(name), HeaderValue::from_static(value));
    }
    resp
}

/// Why a request was refused; the message is the JSON error the client sees.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("cross-origin request refused: Origin {origin:?} is not this node's origin {own:?}; \
             send the bearer token or use the node's own page")]
    CrossOrigin { origin: String, own: String },
    #[error("cross-origin request refused: Sec-Fetch-Site is {0:?}; send the bearer token or use the node's own page")]
    CrossSite(String),
    #[error("request refused: Host {0:?} is not a loopback name; without http.token this node answers only to \
             localhost or a loopback address (DNS rebinding protection)")]
    ForeignHost(String),
}

fn header_str<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a str> {
    // A value that is not visible ASCII is treated as present but unmatched,
    // never as absent: absence is what lets a request through.
    headers.get(name).map(|v| v.to_str().unwrap_or("\u{fffd}"))
}

/// (host in lower case without IPv6 brackets, port) of `host[:port]`; the
/// default port is 80, the node serves plain HTTP.
fn host_port(authority: &str) -> Option<(String, u16)> {
    let a = Authority::from_str(authority).ok()?;
    if a.as_str().contains('@') {
        return None;
    }
    let host = a.host().trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
    Some((host, a.port_u16().unwrap_or(80)))
}

/// Does `origin` (the header's serialisation `scheme://host[:port]`) name
/// the same origin as the request's `Host`?
fn same_origin(origin: &str, host: Option<&str>) -> bool {
    let Some(own) = host.and_then(host_port) else { return false };
    let Ok(uri) = Uri::from_str(origin) else { return false };
    let path_ok = matches!(uri.path_and_query().map(|p| p.as_str()), None | Some("") | Some("/"));
    uri.scheme_str() == Some("http")
        && path_ok
        && uri.authority().and_then(|a| host_port(a.as_str())).is_some_and(|o| o == own)
}

/// The same-origin proof for a state-changing request without the token.
pub fn check_same_origin(headers: &HeaderMap) -> Result<(), Refusal> {
    let host = header_str(headers, &header::HOST);
    if let Some(site) = header_str(headers, &HeaderName::from_static("sec-fetch-site")) {
        // "same-site" is refused too: another port on 127.0.0.1 is the same
        // site, and any local web app could be the attacker's foothold.
        if !matches!(site, "same-origin" | "none") {
            return Err(Refusal::CrossSite(site.to_owned()));
        }
    }
    if let Some(origin) = header_str(headers, &header::ORIGIN) {
        if !same_origin(origin, host) {
            return Err(Refusal::CrossOrigin {
                origin: origin.to_owned(),
                own: host.map(|h| format!("http://{h}")).unwrap_or_else(|| "(no Host header)".into()),
            });
        }
    }
    Ok(())
}

/// The Host check against DNS rebinding, for a node without a token. A
/// request without `Host` is no browser's.
pub fn check_loopback_host(headers: &HeaderMap) -> Result<(), Refusal> {
    let Some(host) = header_str(headers, &header::HOST) else { return Ok(()) };
    let loopback = host_port(host).is_some_and(|(h, _)| {
        h == "localhost" || h.ends_with(".localhost") || IpAddr::from_str(&h).is_ok_and(|ip| ip.is_loopback())
    });
    if loopback {
        Ok(())
    } else {
        Err(Refusal::ForeignHost(host.to_owned()))
    }
}

pub fn has_valid_token(token: Option<&str>, headers: &HeaderMap) -> bool {
    let Some(expected) = token else { return false };
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| super::constant_time_eq(t.as_bytes(), expected.as_bytes()))
}

pub async fn same_origin_guard(State(state): State<Shared>, req: Request, next: Next) -> Response {
    let headers = req.headers();
    let path = req.uri().path();
    let probe = matches!(path, "/healthz" | "/readyz");
    let verdict = if state.token.is_none() && !probe {
        check_loopback_host(headers)
    } else {
        Ok(())
    };
    let safe = matches!(*req.method(), Method::GET | Method::HEAD);
    // A browser cannot attach Authorization cross-origin without a CORS
    // preflight, which gets no CORS answer here: the token is proof enough.
    let verdict = verdict.and_then(|()| {
        if safe || has_valid_token(state.token.as_deref(), headers) {
            Ok(())
        } else {
            check_same_origin(headers)
        }
    });
    match verdict {
        Ok(()) => next.run(req).await,
        Err(refusal) => {
            tracing::warn!(method = %req.method(), path = %path, reason = %refusal, "HTTP request refused");
            discard_body(req.into_body()).await;
            (StatusCode::FORBIDDEN, axum::Json(serde_json::json!({ "error": refusal.to_string() }))).into_response()
        }
    }
}

/// Reads and drops what the client is still sending (bounded in bytes and
/// time, never held), so that it reads our 403 instead of a connection
/// reset in the middle of its upload.
async fn discard_body(mut body: axum::body::Body) {
    use axum::body::HttpBody;
    let drain = async move {
        let mut seen = 0usize;
        while let Some(Ok(frame)) = std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await {
            seen += frame.data_ref().map_or(0, |d| d.len());
            if seen > super::api::MAX_UPLOAD {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), drain).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(HeaderName::from_str(k).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn same_origin_requests_pass() {
        for (host, origin) in [
            ("127.0.0.1:8080", "http://127.0.0.1:8080"),
            ("LOCALHOST:8080", "http://localhost:8080"),
            ("[::1]:9000", "http://[::1]:9000"),
            ("node.example", "http://node.example:80"),
            ("node.example:80", "http://node.example"),
        ] {
            let h = headers(&[("host", host), ("origin", origin), ("sec-fetch-site", "same-origin")]);
            assert_eq!(check_same_origin(&h), Ok(()), "{host} {origin}");
        }
        // user-initiated (typed URL, bookmark)
        assert_eq!(check_same_origin(&headers(&[("host", "h:1"), ("sec-fetch-site", "none")])), Ok(()));
        // no browser at all: curl, scripts, monitoring
        assert_eq!(check_same_origin(&headers(&[("host", "h:1")])), Ok(()));
        assert_eq!(check_same_origin(&HeaderMap::new()), Ok(()));
    }

    #[test]
    fn cross_origin_requests_are_refused() {
        for origin in [
            "http://evil.example",
            "http://127.0.0.1:8081",  // another port: same site, other origin
            "https://127.0.0.1:8080", // other scheme
            "http://127.0.0.1",       // port 80
            "null",                   // sandboxed frame, file:, data:
            "http://127.0.0.1:8080@evil.example",
            "http://evil.example/http://127.0.0.1:8080",
            "",
        ] {
            let h = headers(&[("host", "127.0.0.1:8080"), ("origin", origin)]);
            assert!(matches!(check_same_origin(&h), Err(Refusal::CrossOrigin { .. })), "{origin:?}");
        }
        // an Origin with no Host to compare it to proves nothing
        assert!(check_same_origin(&headers(&[("origin", "http://127.0.0.1:8080")])).is_err());
        for site in ["cross-site", "same-site", "bogus"] {
            let h = headers(&[("host", "127.0.0.1:8080"), ("sec-fetch-site", site)]);
            assert_eq!(check_same_origin(&h), Err(Refusal::CrossSite(site.into())));
            // a matching Origin does not outvote it
            let own = ("origin", "http://127.0.0.1:8080");
            let h = headers(&[("host", "127.0.0.1:8080"), own, ("sec-fetch-site", site)]);
            assert!(check_same_origin(&h).is_err());
        }
    }

    #[test]
    fn a_value_that_is_not_text_counts_as_a_mismatch_not_as_absent() {
        let mut h = headers(&[("host", "127.0.0.1:8080")]);
        h.insert(header::ORIGIN, HeaderValue::from_bytes(b"http://\xff").unwrap());
        assert!(check_same_origin(&h).is_err());
    }

    #[test]
    fn only_loopback_names_without_a_token() {
        for host in ["127.0.0.1:8080", "127.1.2.3", "localhost:1", "a.localhost:1", "[::1]:8080", "LocalHost"] {
            assert_eq!(check_loopback_host(&headers(&[("host", host)])), Ok(()), "{host}");
        }
        for host in ["evil.example:8080", "localhost.evil.example", "10.0.0.1:8080", "[::2]", "0.0.0.0:8080", ""] {
            assert!(check_loopback_host(&headers(&[("host", host)])).is_err(), "{host}");
        }
        assert_eq!(check_loopback_host(&HeaderMap::new()), Ok(()));
    }
}
