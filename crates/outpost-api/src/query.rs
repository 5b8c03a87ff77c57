//! Query strings: split and decoded (percent-escapes, `+`) by axum's `Query` into the parameters in
//! the order sent; each endpoint then reads the ones it takes, so a bad or unknown parameter gets
//! the API's own answer (`400 bad_request` naming the parameter and the value) rather than axum's
//! plain-text rejection. As before, the first offending parameter is the one named and a repeated
//! parameter's last value counts.

use axum::extract::rejection::QueryRejection;
use axum::extract::Query;

use crate::error::ApiError;

/// What a handler takes to read its query string.
pub(crate) type QueryPairs = Result<Query<Vec<(String, String)>>, QueryRejection>;

/// The parameters in the order sent, decoded.
pub(crate) fn pairs(query: QueryPairs) -> Result<Vec<(String, String)>, ApiError> {
    let Query(pairs) = query.map_err(|rejection| ApiError::bad_request(rejection.body_text()))?;
    Ok(pairs)
}

/// 400 for a parameter the endpoint does not take.
pub(crate) fn unknown(name: &str) -> ApiError {
    ApiError::bad_request(format!("unknown query parameter {name:?}"))
}

/// A number parameter, or 400 `{name}="{value}" is not a number`.
pub(crate) fn number<N: std::str::FromStr>(name: &str, value: &str) -> Result<N, ApiError> {
    value.parse().map_err(|_| ApiError::bad_request(format!("{name}={value:?} is not a number")))
}

#[cfg(test)]
mod tests {
    use axum::extract::FromRequestParts;

    use super::*;

    async fn parse(query: &str) -> Vec<(String, String)> {
        let request = axum::http::Request::builder().uri(format!("/x?{query}")).body(()).unwrap();
        let (mut parts, ()) = request.into_parts();
        pairs(Query::from_request_parts(&mut parts, &()).await).unwrap()
    }

    #[tokio::test]
    async fn parameters_come_decoded_and_in_order() {
        let pair = |name: &str, value: &str| (name.to_string(), value.to_string());
        assert_eq!(parse("").await, []);
        assert_eq!(parse("limit=5&&limit=7").await, [pair("limit", "5"), pair("limit", "7")]);
        assert_eq!(parse("limit").await, [pair("limit", "")]);
        assert_eq!(
            parse("route=consumer%3Aa&route=consumer:b&x=a+b%20c").await,
            [pair("route", "consumer:a"), pair("route", "consumer:b"), pair("x", "a b c")]
        );
    }

    #[test]
    fn bad_values_name_the_parameter() {
        assert_eq!(number::<u64>("after_seq", "7").unwrap(), 7);
        let error = number::<u64>("after_seq", "-1").unwrap_err();
        assert_eq!(
            (error.status.as_u16(), error.message.as_str()),
            (400, r#"after_seq="-1" is not a number"#)
        );
        assert_eq!(unknown("colour").message, r#"unknown query parameter "colour""#);
    }
}
