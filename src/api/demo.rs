//! The chat demo (`[api] demo = true`): examples/chat/index.html and the JavaScript client,
//! compiled into the binary so the demo needs no files on the host, and `config.json`, which
//! tells the page where the WebSocket listeners are.

use super::http::Response;

const PAGE: &str = include_str!("../../examples/chat/index.html");
const CLIENT: &str = include_str!("../../clients/js/groupcast.js");

/// The answer to `GET path` under `/demo`, if there is one.
pub fn serve(path: &str, ws_port: Option<u16>, wss_port: Option<u16>) -> Option<Response> {
    let (content_type, body) = match path {
        "/demo/" | "/demo/index.html" => ("text/html; charset=utf-8", PAGE.as_bytes().to_vec()),
        "/demo/groupcast.js" => ("text/javascript; charset=utf-8", CLIENT.as_bytes().to_vec()),
        "/demo/config.json" => (
            "application/json",
            serde_json::json!({ "ws_port": ws_port, "wss_port": wss_port }).to_string().into_bytes(),
        ),
        _ => return None,
    };
    Some(Response { status: 200, content_type, body, headers: Vec::new(), close: false })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_and_the_client_are_served() {
        assert!(serve("/demo/", Some(1), None).unwrap().content_type.starts_with("text/html"));
        let client = serve("/demo/groupcast.js", None, None).unwrap();
        assert!(String::from_utf8(client.body).unwrap().contains("export function connect"));
        let config = serve("/demo/config.json", Some(1234), None).unwrap();
        assert_eq!(config.body, br#"{"ws_port":1234,"wss_port":null}"#);
        assert!(serve("/demo/../etc/passwd", None, None).is_none());
    }
}
