//! The server's address, treated as a value that may hold secrets (a `user:password@`, an
//! `?api_key=` parameter):
//!
//! - [`redact_url`] is the one way an address is shown: logs, errors, the model identity (which
//!   goes into fingerprints, cache keys and the `model` column of tables). A URL with nothing to
//!   hide comes back byte for byte, so identities of such URLs never change;
//! - [`credentials_at_risk`] says what a request would carry in clear text across the network
//!   (plain `http` to a host other than this machine), so the client can refuse to start;
//! - [`check_redirect`] is the redirect policy: a request, which holds document text and
//!   maybe the key, follows a redirect only within its origin (scheme, host and port).

use reqwest::Url;
use std::net::IpAddr;

/// What replaces a secret query parameter's value.
pub const REDACTED: &str = "REDACTED";

/// Redirects followed within one origin before the request fails.
pub const MAX_REDIRECTS: usize = 5;

/// Whether a query parameter's name looks like it holds a secret (`api_key`, `key`, `token`,
/// `access_token`, `secret`, `password`, `sig`, ...). A percent-encoded name cannot be judged
/// by eye and counts as secret.
fn secret_param(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    const WORDS: [&str; 9] = [
        "key",
        "token",
        "secret",
        "pass",
        "pwd",
        "auth",
        "credential",
        "session",
        "signature",
    ];
    name.contains('%') || name == "sig" || WORDS.iter().any(|w| name.contains(w))
}

/// The query with every secret-looking parameter's value replaced by [`REDACTED`], or `None`
/// when there is none.
fn redact_query(query: &str) -> Option<String> {
    let mut changed = false;
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| {
            let name = pair.split('=').next().unwrap_or_default();
            if secret_param(name) {
                changed = true;
                format!("{name}={REDACTED}")
            } else {
                pair.to_string()
            }
        })
        .collect();
    changed.then(|| pairs.join("&"))
}

/// `url` fit to be shown or stored: no user name or password, secret-looking query values
/// replaced by `REDACTED`, no fragment. Unchanged (the same string) when there is nothing to
/// remove. A string that does not parse as an http(s) URL is cut conservatively: everything
/// between `://` (or the start) and the last `@` before the query goes.
pub fn redact_url(url: &str) -> String {
    if let Ok(mut parsed) = Url::parse(url)
        && matches!(parsed.scheme(), "http" | "https")
    {
        let query = parsed.query().and_then(redact_query);
        let userinfo = !parsed.username().is_empty() || parsed.password().is_some();
        if !userinfo && query.is_none() && parsed.fragment().is_none() {
            return url.to_string();
        }
        // `set_username` fails only for URLs that cannot have one, which have none.
        let _ = parsed.set_username("");
        let _ = parsed.set_password(None);
        if let Some(q) = query {
            parsed.set_query(Some(&q));
        }
        parsed.set_fragment(None);
        return parsed.to_string();
    }
    let url = url.split('#').next().unwrap_or_default();
    let (head, query) = match url.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (url, None),
    };
    // cannot fail: "://" and '@' are ASCII, found at `s` and `at`.
    let head = match (head.find("://"), head.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}{}", &head[..s + 3], &head[at + 1..]),
        (None, Some(at)) => head[at + 1..].to_string(),
        _ => head.to_string(),
    };
    match query {
        Some(q) => format!("{head}?{}", redact_query(q).unwrap_or_else(|| q.to_string())),
        None => head,
    }
}

/// Whether `url` points at this machine: `localhost`, 127.0.0.0/8 or `::1`.
pub fn is_loopback(url: &Url) -> bool {
    url.host_str().is_some_and(|h| {
        let h = h.trim_start_matches('[').trim_end_matches(']');
        h.eq_ignore_ascii_case("localhost") || h.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
    })
}

/// What a request to `url` would carry in clear text to another machine: `None` when nothing
/// (https, a loopback address, or no credentials at all), else the credentials in words (the
/// API key, the URL's user info, its secret-looking query parameters).
pub fn credentials_at_risk(url: &Url, api_key: bool) -> Option<String> {
    if url.scheme() != "http" || is_loopback(url) {
        return None;
    }
    let mut what = Vec::new();
    if api_key {
        what.push("the API key".to_string());
    }
    if !url.username().is_empty() || url.password().is_some() {
        what.push("the user name and password in the URL".to_string());
    }
    let params: Vec<&str> = url
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|p| p.split('=').next())
        .filter(|n| !n.is_empty() && secret_param(n))
        .collect();
    if !params.is_empty() {
        what.push(format!("the query parameter(s) {}", params.join(", ")));
    }
    (!what.is_empty()).then(|| what.join(" and "))
}

/// How an origin is shown: `scheme://host[:port]` (never user info), or `scheme:` for a URL
/// without a network origin (`file:`, `data:`).
pub fn origin_of(url: &Url) -> String {
    let origin = url.origin();
    if origin.is_tuple() {
        origin.ascii_serialization()
    } else {
        format!("{}:", url.scheme())
    }
}

/// The redirect policy, given the URLs requested so far (the first is the original) and the
/// next one: follow within the original's origin, at most [`MAX_REDIRECTS`] times; refuse a
/// move to another origin (another host or port, or `https` to `http`), which would hand the
/// document text, and with a 307/308 the whole request, to a server nobody configured.
pub fn check_redirect(previous: &[Url], next: &Url) -> Result<(), String> {
    let Some(first) = previous.first() else {
        return Ok(());
    };
    if first.origin() != next.origin() || !next.origin().is_tuple() {
        return Err(format!(
            "the server redirected the request to another origin, {}; not followed (requests hold \
             document text): point the base URL at the server that answers",
            origin_of(next)
        ));
    }
    if previous.len() > MAX_REDIRECTS {
        return Err(format!(
            "more than {MAX_REDIRECTS} redirects; not followed: point the base URL at the server that answers"
        ));
    }
    Ok(())
}

/// [`check_redirect`] as reqwest's policy.
pub fn redirect_policy() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| match check_redirect(attempt.previous(), attempt.url()) {
        Ok(()) => attempt.follow(),
        Err(e) => attempt.error(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn redact_url_removes_user_info_and_secret_parameters_and_nothing_else() {
        // Nothing to hide: the same string (identities of such URLs stay as they were).
        for plain in [
            "http://127.0.0.1:8080/v1",
            "https://api.example.com/v1/",
            "https://h/v1?api-version=2024-06-01",
            "not a url at all",
        ] {
            assert_eq!(redact_url(plain), plain);
        }
        assert_eq!(
            redact_url("https://user:pass@host.example/v1"),
            "https://host.example/v1"
        );
        assert_eq!(redact_url("https://sk-only@host/v1"), "https://host/v1");
        assert_eq!(
            redact_url("https://host/v1?api_key=sk-1&api-version=2&key=k2&access_token=t&sig=s#frag"),
            "https://host/v1?api_key=REDACTED&api-version=2&key=REDACTED&access_token=REDACTED&sig=REDACTED"
        );
        assert_eq!(
            redact_url("http://u:p@[::1]:8000/v1?X-Api%2DKey=s"),
            "http://[::1]:8000/v1?X-Api%2DKey=REDACTED"
        );
        // Unparseable (a space in the host, a bad port): cut by hand, still without secrets.
        assert_eq!(
            redact_url("https://u:p w@ho st/v1?token=t"),
            "https://ho st/v1?token=REDACTED"
        );
        assert_eq!(redact_url("u:pw@host:99999/v1"), "host:99999/v1");
        for s in ["https://user:pass@host.example/v1", "http://a:b@host:x/v1?password=c"] {
            let shown = redact_url(s);
            assert!(
                !shown.contains("pass@") && !shown.contains(":b@") && !shown.contains("=c"),
                "{shown}"
            );
        }
    }

    #[test]
    fn credentials_count_as_at_risk_only_in_clear_text_to_another_machine() {
        let remote = url("http://192.0.2.1/v1");
        assert_eq!(credentials_at_risk(&remote, true).as_deref(), Some("the API key"));
        assert_eq!(credentials_at_risk(&remote, false), None);
        let with_url_secrets = url("http://u:p@192.0.2.1/v1?api_key=x&v=1");
        let what = credentials_at_risk(&with_url_secrets, false).unwrap();
        assert!(
            what.contains("user name") && what.contains("api_key") && !what.contains("v,"),
            "{what}"
        );
        for safe in [
            "https://192.0.2.1/v1",
            "http://127.0.0.1:8080/v1",
            "http://127.3.2.1/v1",
            "http://localhost:8000/v1",
            "http://[::1]:8000/v1",
        ] {
            assert_eq!(credentials_at_risk(&url(safe), true), None, "{safe}");
        }
    }

    #[test]
    fn redirects_are_followed_within_the_origin_only() {
        let start = [url("http://127.0.0.1:8080/v1/chat/completions")];
        assert!(check_redirect(&start, &url("http://127.0.0.1:8080/v2/chat/completions")).is_ok());
        for (other, shown) in [
            ("http://127.0.0.1:9090/v1/chat/completions", "http://127.0.0.1:9090"),
            ("http://evil.example/v1", "http://evil.example"),
            ("https://127.0.0.1:8080/v1", "https://127.0.0.1:8080"),
            ("http://user:secret@other.example:81/x", "http://other.example:81"),
            ("file:///etc/passwd", "file:"),
        ] {
            let e = check_redirect(&start, &url(other)).unwrap_err();
            assert!(e.contains(&format!("another origin, {shown};")), "{e}");
            assert!(!e.contains("secret"), "{e}");
        }
        // https -> http on the same host is a downgrade: another origin.
        let secure = [url("https://api.example.com/v1/chat/completions")];
        assert!(check_redirect(&secure, &url("http://api.example.com/v1/chat/completions")).is_err());
        let chain: Vec<Url> = (0..=MAX_REDIRECTS)
            .map(|i| url(&format!("http://127.0.0.1:8080/{i}")))
            .collect();
        assert!(
            check_redirect(&chain, &url("http://127.0.0.1:8080/next"))
                .unwrap_err()
                .contains("redirects")
        );
    }
}
