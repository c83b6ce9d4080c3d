//! The operator's dashboard: one HTML page, one script and one style sheet, embedded in
//! the binary (it works offline, no CDN) and served by the admin listener at `/`,
//! `/dashboard.js` and `/dashboard.css`.
//!
//! The page reads `/status` like any scraper and calls the same admin endpoints as
//! `keyway ctl`, sending the operator's token as `Authorization: Bearer`. This module
//! only hands out the files with their security headers; it never reads state, never
//! decides anything and never serves anything but these three files.

use http::{header, HeaderValue, Response, StatusCode};

use keyway_proxy::body::{self, Body};

const INDEX_HTML: &str = include_str!("dashboard/index.html");
const DASHBOARD_JS: &str = include_str!("dashboard/dashboard.js");
const DASHBOARD_CSS: &str = include_str!("dashboard/dashboard.css");

/// Only the page's own files; no inline script or style, no frames, no form posts
/// elsewhere. `connect-src 'self'` is what lets the script poll `/status`.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The dashboard file at `path`, if it is one.
pub fn asset(path: &str) -> Option<Response<Body>> {
    let (ctype, text) = match path {
        "/" | "/index.html" => ("text/html; charset=utf-8", INDEX_HTML),
        "/dashboard.js" => ("text/javascript; charset=utf-8", DASHBOARD_JS),
        "/dashboard.css" => ("text/css; charset=utf-8", DASHBOARD_CSS),
        _ => return None,
    };
    let mut r = Response::new(body::full(text.to_string()));
    *r.status_mut() = StatusCode::OK;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    Some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_has_its_type_and_the_security_headers() {
        for (path, ctype) in [
            ("/", "text/html; charset=utf-8"),
            ("/dashboard.js", "text/javascript; charset=utf-8"),
            ("/dashboard.css", "text/css; charset=utf-8"),
        ] {
            let r = asset(path).expect(path);
            let h = r.headers();
            assert_eq!(h[header::CONTENT_TYPE], ctype, "{path}");
            assert_eq!(h[header::CACHE_CONTROL], "no-cache");
            assert_eq!(h[header::X_FRAME_OPTIONS], "DENY");
            assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
            assert_eq!(h[header::REFERRER_POLICY], "no-referrer");
            let csp = h[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
            assert!(csp.starts_with("default-src 'self'"), "{csp}");
            assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"));
        }
        assert!(asset("/status").is_none());
        assert!(asset("/dashboard.js.map").is_none());
    }

    #[test]
    fn the_page_has_no_inline_script_or_style_and_never_uses_inner_html() {
        // The CSP would block them; this says why the page went blank before a browser does.
        assert!(!INDEX_HTML.contains("<script>"), "inline script");
        assert!(!INDEX_HTML.contains("style="), "inline style");
        assert!(!INDEX_HTML.contains("onclick"), "inline handler");
        assert!(INDEX_HTML.contains(r#"<script src="/dashboard.js""#));
        // Backend ids, plugin names and `by` fields come from config, peers and plugins:
        // the script renders them as text only.
        for sink in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
        ] {
            assert!(!DASHBOARD_JS.contains(sink), "dashboard.js uses {sink}");
        }
        // The token lives in sessionStorage, never localStorage or a URL.
        assert!(!DASHBOARD_JS.contains("localStorage"));
    }
}
