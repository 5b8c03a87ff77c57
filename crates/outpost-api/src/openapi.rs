//! `GET /openapi.json`: the OpenAPI 3.0 document of the HTTP API (both roles), written by hand and
//! compiled into the binary. No token needed: it holds no data. A test keeps it in step with the
//! router: every route of the router's source is in the document and every path of the document
//! is a route. `scripts/schemathesis.sh` fuzzes a running edge and central from it.

use axum::http::header;
use axum::response::{IntoResponse, Response};

pub(crate) const DOCUMENT: &str = include_str!("openapi.json");

pub(crate) async fn document() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], DOCUMENT).into_response()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::DOCUMENT;

    /// The files that add routes to the router, read as source text.
    const ROUTER_SOURCES: [&str; 5] =
        ["src/lib.rs", "src/central.rs", "src/routes.rs", "src/consumers.rs", "src/console.rs"];
    const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

    /// The text of a parenthesized argument list starting just after `(`, to its matching `)`,
    /// skipping string literals.
    fn argument_list(text: &str) -> &str {
        let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
        for (i, c) in text.char_indices() {
            if in_string {
                match c {
                    _ if escaped => escaped = false,
                    '\\' => escaped = true,
                    '"' => in_string = false,
                    _ => {}
                }
                continue;
            }
            match c {
                '"' => in_string = true,
                '(' => depth += 1,
                ')' if depth == 0 => return &text[..i],
                ')' => depth -= 1,
                _ => {}
            }
        }
        panic!("unbalanced parentheses in the router's source")
    }

    /// Splits at commas outside parentheses and strings.
    fn top_level_arguments(args: &str) -> Vec<&str> {
        let (mut parts, mut start, mut depth, mut in_string) = (Vec::new(), 0, 0usize, false);
        for (i, c) in args.char_indices() {
            match c {
                '"' => in_string = !in_string,
                '(' | '{' | '[' if !in_string => depth += 1,
                ')' | '}' | ']' if !in_string => depth -= 1,
                ',' if !in_string && depth == 0 => {
                    parts.push(args[start..i].trim());
                    start = i + 1;
                }
                _ => {}
            }
        }
        parts.push(args[start..].trim());
        parts
    }

    /// The method functions called at the top level of a method router expression, such as
    /// `post(a).get(b)` or `axum::routing::delete(d)`.
    fn methods_of(expression: &str) -> Vec<String> {
        let mut methods = Vec::new();
        let mut rest = expression;
        while let Some(open) = rest.find('(') {
            let name = rest[..open].rsplit(['.', ':', ' ']).next().unwrap_or("").trim();
            assert!(METHODS.contains(&name), "unexpected call {name:?} in a route: {expression}");
            methods.push(name.to_string());
            let inner = argument_list(&rest[open + 1..]);
            rest = &rest[open + 1 + inner.len() + 1..];
        }
        methods
    }

    fn path_of(argument: &str) -> String {
        if let Some(literal) = argument.strip_prefix('"') {
            return literal.strip_suffix('"').expect("a plain string literal").to_string();
        }
        use outpost_core::wire;
        let constant = match argument {
            "wire::LINK_PATH" => wire::LINK_PATH,
            "wire::LINK_MESSAGES_PATH" => wire::LINK_MESSAGES_PATH,
            "wire::LINK_REPORT_PATH" => wire::LINK_REPORT_PATH,
            "wire::LINK_PROBE_PATH" => wire::LINK_PROBE_PATH,
            "wire::LINK_DOWNLINK_PATH" => wire::LINK_DOWNLINK_PATH,
            other => panic!("a route path this test cannot resolve: {other}; add it here"),
        };
        constant.to_string()
    }

    /// Every (method, path) the router's source registers.
    fn router_operations() -> BTreeSet<(String, String)> {
        let mut operations = BTreeSet::new();
        for file in ROUTER_SOURCES {
            let path = format!("{}/{file}", env!("CARGO_MANIFEST_DIR"));
            let source = std::fs::read_to_string(&path).unwrap();
            let source = source.split("#[cfg(test)]").next().unwrap();
            for (at, _) in source.match_indices(".route(") {
                let args = top_level_arguments(argument_list(&source[at + ".route(".len()..]));
                assert_eq!(args.len(), 2, "a .route call with two arguments in {file}: {args:?}");
                let route_path = path_of(args[0]);
                for method in methods_of(args[1]) {
                    assert!(
                        operations.insert((method.clone(), route_path.clone())),
                        "{method} {route_path} registered twice"
                    );
                }
            }
        }
        operations
    }

    fn document_operations() -> BTreeSet<(String, String)> {
        let document: serde_json::Value = serde_json::from_str(DOCUMENT).expect("openapi.json is JSON");
        let mut operations = BTreeSet::new();
        for (path, item) in document["paths"].as_object().expect("paths") {
            for method in item.as_object().expect("a path item").keys() {
                if METHODS.contains(&method.as_str()) {
                    operations.insert((method.clone(), path.clone()));
                }
            }
        }
        operations
    }

    #[test]
    fn openapi_document_matches_the_router() {
        let router = router_operations();
        assert!(router.len() >= 40, "the source scan found the routes: {router:?}");
        assert!(router.contains(&("get".to_string(), "/openapi.json".to_string())));
        let document = document_operations();
        let missing: Vec<_> = router.difference(&document).collect();
        let extra: Vec<_> = document.difference(&router).collect();
        assert!(missing.is_empty(), "routes missing from openapi.json: {missing:?}");
        assert!(extra.is_empty(), "openapi.json describes operations the router lacks: {extra:?}");
    }

    #[test]
    fn openapi_document_is_consistent() {
        let document: serde_json::Value = serde_json::from_str(DOCUMENT).expect("openapi.json is JSON");
        assert!(document["openapi"].as_str().is_some_and(|v| v.starts_with("3.0")));
        let error = &document["components"]["schemas"]["Error"];
        assert_eq!(error["required"], serde_json::json!(["error"]));
        assert_eq!(error["properties"]["error"]["required"], serde_json::json!(["code", "message"]));
        // Every reference resolves, and every operation says what it answers.
        let mut references = Vec::new();
        collect_references(&document, &mut references);
        for reference in references {
            let pointer = reference.strip_prefix('#').expect("local references only");
            assert!(document.pointer(pointer).is_some(), "unresolved $ref {reference}");
        }
        for (path, item) in document["paths"].as_object().unwrap() {
            for (method, operation) in item.as_object().unwrap() {
                let responses = operation["responses"].as_object().expect("responses");
                assert!(
                    responses.keys().any(|status| status.starts_with('2')),
                    "{method} {path} has no success answer"
                );
                for name in path.split('/').filter_map(|s| s.strip_prefix('{')?.strip_suffix('}')) {
                    let declared = operation["parameters"].as_array().into_iter().flatten().any(|p| {
                        let p = match p.get("$ref").and_then(|r| r.as_str()) {
                            Some(r) => document.pointer(r.strip_prefix('#').unwrap()).unwrap(),
                            None => p,
                        };
                        p["in"] == "path" && p["name"] == name
                    });
                    assert!(declared, "{method} {path} does not declare its path parameter {name}");
                }
            }
        }
    }

    fn collect_references(value: &serde_json::Value, out: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, value) in map {
                    match (key.as_str(), value.as_str()) {
                        ("$ref", Some(reference)) => out.push(reference.to_string()),
                        _ => collect_references(value, out),
                    }
                }
            }
            serde_json::Value::Array(values) => values.iter().for_each(|v| collect_references(v, out)),
            _ => {}
        }
    }
}
