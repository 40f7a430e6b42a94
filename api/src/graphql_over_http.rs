//! GraphQL over HTTP as its specification says (the graphql-http audit checks it): the request
//! read from a JSON body or a query string into typed parameters, with a 4xx and a JSON error
//! body for anything that is not a GraphQL request; the media type chosen from `Accept`
//! (`application/graphql-response+json` when the client asks for it, else `application/json`);
//! and the status code chosen from the response (request errors are 400 under
//! `application/graphql-response+json` and carry no `data` entry; under `application/json` a
//! well-formed request that fails parsing or validation is 200, as the specification asks of
//! that legacy media type).

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

/// The media type of answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MediaType {
    /// `application/graphql-response+json`.
    GraphqlResponseJson,
    /// `application/json`.
    Json,
}

impl MediaType {
    fn content_type(self) -> &'static str {
        match self {
            MediaType::GraphqlResponseJson => "application/graphql-response+json; charset=utf-8",
            MediaType::Json => "application/json; charset=utf-8",
        }
    }
}

/// Chooses the answer's media type from `Accept`: `None` when the client accepts neither.
pub(crate) fn negotiate(headers: &HeaderMap) -> Option<MediaType> {
    let Some(accept) = headers
        .get(header::ACCEPT)
        .and_then(|value| value.to_str().ok())
    else {
        return Some(MediaType::Json);
    };
    let mut json = false;
    let mut graphql_response = false;
    for item in accept.split(',') {
        let mut parts = item.split(';');
        let media = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
        let refused = parts.any(|parameter| {
            parameter
                .trim()
                .strip_prefix("q=")
                .and_then(|q| q.trim().parse::<f32>().ok())
                .is_some_and(|q| q <= 0.0)
        });
        if refused {
            continue;
        }
        match media.as_str() {
            "application/graphql-response+json" => graphql_response = true,
            "application/json" | "application/*" | "*/*" => json = true,
            _ => {}
        }
    }
    if graphql_response {
        Some(MediaType::GraphqlResponseJson)
    } else if json || accept.trim().is_empty() {
        Some(MediaType::Json)
    } else {
        None
    }
}

/// A request that is not a GraphQL request: answered before anything runs.
#[derive(Debug)]
pub(crate) struct RequestError {
    pub status: StatusCode,
    pub message: String,
}

impl RequestError {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

/// Reads a POST body. `content_type` must be JSON; the body one JSON object.
pub(crate) fn parse_post(
    content_type: Option<&str>,
    body: &[u8],
) -> Result<async_graphql::Request, RequestError> {
    let media = content_type.map(|value| {
        value
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase()
    });
    match media.as_deref() {
        Some("application/json") => {}
        Some(other) => {
            return Err(RequestError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("send the request as application/json, not {other}"),
            ));
        }
        None => {
            return Err(RequestError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "send the request with Content-Type: application/json",
            ));
        }
    }
    if body.is_empty() {
        return Err(RequestError::bad(
            "the request body is empty; send {\"query\": \"…\"}",
        ));
    }
    let value: Value = serde_json::from_slice(body)
        .map_err(|_| RequestError::bad("the request body is not valid JSON"))?;
    match value {
        Value::Object(map) => parameters(map),
        Value::Array(_) => Err(RequestError::bad(
            "batched requests are not accepted; send one operation per request",
        )),
        _ => Err(RequestError::bad(
            "the request body must be a JSON object like {\"query\": \"…\"}",
        )),
    }
}

/// Reads a GET query string (`query`, `operationName`, and `variables`/`extensions` as JSON).
pub(crate) fn parse_get(query_string: &str) -> Result<async_graphql::Request, RequestError> {
    let pairs: Vec<(String, String)> = axum::extract::Query::<Vec<(String, String)>>::try_from_uri(
        &format!("/?{query_string}")
            .parse()
            .map_err(|_| RequestError::bad("the query string is not readable"))?,
    )
    .map_err(|_| RequestError::bad("the query string is not readable"))?
    .0;
    let mut map = Map::new();
    for (name, value) in pairs {
        if map.contains_key(&name) {
            return Err(RequestError::bad(format!("{name} is given more than once")));
        }
        let value = match name.as_str() {
            "variables" | "extensions" => serde_json::from_str(&value)
                .map_err(|_| RequestError::bad(format!("{name} must be a JSON object")))?,
            _ => Value::String(value),
        };
        map.insert(name, value);
    }
    parameters(map)
}

fn parameters(mut map: Map<String, Value>) -> Result<async_graphql::Request, RequestError> {
    let query = match map.remove("query") {
        Some(Value::String(query)) => query,
        Some(_) => return Err(RequestError::bad("query must be a string")),
        None => return Err(RequestError::bad("the request has no query")),
    };
    let operation_name = match map.remove("operationName") {
        None | Some(Value::Null) => None,
        Some(Value::String(name)) => Some(name),
        Some(_) => return Err(RequestError::bad("operationName must be a string")),
    };
    let variables = match map.remove("variables") {
        None | Some(Value::Null) => None,
        Some(object @ Value::Object(_)) => Some(object),
        Some(_) => return Err(RequestError::bad("variables must be a JSON object")),
    };
    let extensions = match map.remove("extensions") {
        None | Some(Value::Null) => None,
        Some(object @ Value::Object(_)) => Some(object),
        Some(_) => return Err(RequestError::bad("extensions must be a JSON object")),
    };
    let mut request = async_graphql::Request::new(query);
    request.operation_name = operation_name;
    if let Some(variables) = variables {
        request.variables = async_graphql::Variables::from_json(variables);
    }
    if let Some(extensions) = extensions {
        request.extensions = serde_json::from_value(extensions)
            .map_err(|_| RequestError::bad("extensions must be a JSON object"))?;
    }
    Ok(request)
}

/// Whether a response was refused before anything ran (parse, validation, a limit): no field
/// resolved, every error without a path.
pub(crate) fn is_request_error(response: &async_graphql::Response) -> bool {
    response.data == async_graphql::Value::Null
        && !response.errors.is_empty()
        && response.errors.iter().all(|error| error.path.is_empty())
}

/// The first error's code, if the response has errors.
pub(crate) fn first_code(response: &async_graphql::Response) -> Option<String> {
    let extensions = response.errors.first()?.extensions.as_ref()?;
    match extensions.get("code")? {
        async_graphql::Value::String(code) => Some(code.clone()),
        _ => None,
    }
}

/// A JSON answer in the negotiated media type.
pub(crate) fn respond(status: StatusCode, media: MediaType, body: Vec<u8>) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(media.content_type()),
        )],
        body,
    )
        .into_response()
}

/// The answer to a request that is not a GraphQL request.
pub(crate) fn request_error_response(error: RequestError, media: MediaType) -> Response {
    error_body_response(error.status, media, "BAD_USER_INPUT", &error.message)
}

/// One error with a code, in a GraphQL response body without `data`.
pub(crate) fn error_body_response(
    status: StatusCode,
    media: MediaType,
    code: &str,
    message: &str,
) -> Response {
    let body = json!({"errors": [{"message": message, "extensions": {"code": code}}]});
    respond(status, media, body.to_string().into_bytes())
}

/// The status for an executed response: under `application/graphql-response+json` a request
/// error is 400 (429 when rate limited, 401 when the token was refused); a response with a
/// `data` entry is 200. Under `application/json` everything that ran is 200, except the rate
/// limiter's and the token's refusals, which keep 429 and 401 so clients and proxies see them.
pub(crate) fn status_for(response: &async_graphql::Response, media: MediaType) -> StatusCode {
    if !is_request_error(response) {
        return StatusCode::OK;
    }
    match first_code(response).as_deref() {
        Some("RATE_LIMITED") => StatusCode::TOO_MANY_REQUESTS,
        Some("UNAUTHENTICATED") => StatusCode::UNAUTHORIZED,
        _ if media == MediaType::GraphqlResponseJson => StatusCode::BAD_REQUEST,
        _ => StatusCode::OK,
    }
}

/// Serialises a response; a request error under `application/graphql-response+json` has no
/// `data` entry.
pub(crate) fn body(response: &async_graphql::Response, media: MediaType) -> Option<Vec<u8>> {
    if media == MediaType::GraphqlResponseJson && is_request_error(response) {
        serde_json::to_vec(&json!({"errors": response.errors})).ok()
    } else {
        serde_json::to_vec(response).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(value: &str) -> Option<MediaType> {
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, value.parse().unwrap());
        negotiate(&headers)
    }

    #[test]
    fn the_media_type_follows_accept() {
        assert_eq!(negotiate(&HeaderMap::new()), Some(MediaType::Json));
        assert_eq!(accept("application/json"), Some(MediaType::Json));
        assert_eq!(accept("*/*"), Some(MediaType::Json));
        assert_eq!(
            accept("application/graphql-response+json"),
            Some(MediaType::GraphqlResponseJson)
        );
        assert_eq!(
            accept("application/graphql-response+json, application/json;q=0.9"),
            Some(MediaType::GraphqlResponseJson)
        );
        assert_eq!(
            accept("application/graphql-response+json;q=0, application/json"),
            Some(MediaType::Json)
        );
        assert_eq!(accept("text/html"), None);
    }

    #[test]
    fn only_json_objects_with_a_string_query_are_requests() {
        let json = Some("application/json; charset=utf-8");
        assert!(parse_post(json, br#"{"query":"{ me { id } }","variables":null}"#).is_ok());
        for (body, status) in [
            (&br#"[{"query":"{ a }"}]"#[..], 400),
            (b"{not json", 400),
            (b"", 400),
            (br#"{"query": 1}"#, 400),
            (br#"{"variables": {}}"#, 400),
            (br#"{"query":"{ a }","variables":"{}"}"#, 400),
            (br#"{"query":"{ a }","operationName":5}"#, 400),
            (br#"{"query":"{ a }","extensions":[1]}"#, 400),
        ] {
            let error = parse_post(json, body).unwrap_err();
            assert_eq!(
                error.status.as_u16(),
                status,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        assert_eq!(
            parse_post(Some("text/plain"), b"{}").unwrap_err().status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        );
        assert_eq!(
            parse_post(None, b"{}").unwrap_err().status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        );
    }

    #[test]
    fn get_parameters_carry_json_variables() {
        let request =
            parse_get("query=query%20Q(%24n%3AString!)%7B__type(name%3A%24n)%7Bname%7D%7D&variables=%7B%22n%22%3A%22Query%22%7D&operationName=Q")
                .unwrap();
        assert_eq!(request.operation_name.as_deref(), Some("Q"));
        assert!(parse_get("query=%7B__typename%7D&variables=nope").is_err());
        assert!(parse_get("operationName=Q").is_err());
    }
}
