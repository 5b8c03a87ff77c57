//! `GET /`: the web console, an operator's tool that reads and acts through the node's own JSON API
//! with the operator's token. Plain HTML, CSS and JavaScript compiled into the binary: no build
//! step, nothing fetched from the internet at run time. See docs/console.md.

use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use std::sync::Arc;

use crate::ApiState;

const INDEX_HTML: &str = include_str!("console/index.html");
const CONSOLE_CSS: &str = include_str!("console/console.css");
const CONSOLE_JS: &str = include_str!("console/console.js");

/// The page and its two assets. They need no token: they hold no data, and every call the page
/// makes is authorized by the API itself.
pub fn routes() -> Router<Arc<ApiState>> {
    Router::new()
        .route("/", get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }))
        .route("/console.css", get(|| async { asset("text/css; charset=utf-8", CONSOLE_CSS) }))
        .route("/console.js", get(|| async { asset("text/javascript; charset=utf-8", CONSOLE_JS) }))
}

/// The page may load and call only its own node: no inline script, nothing from elsewhere, never
/// framed by another site.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    // no-cache: a browser revalidates, so an upgraded node never runs an old script.
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_only_its_own_assets() {
        for asset in [INDEX_HTML, CONSOLE_CSS, CONSOLE_JS] {
            assert!(
                !asset.contains("http://") && !asset.contains("https://"),
                "no external URL in the console"
            );
        }
        assert!(INDEX_HTML.contains(r#"<script src="/console.js""#));
        assert!(INDEX_HTML.contains(r#"<link rel="stylesheet" href="/console.css">"#));
    }
}
