//! hello: the SDK's example filter. Stamps a request header, refuses requests under a path
//! prefix with 403, counts what it saw, and marks responses.
//!
//! Configuration: `{"header": "x-hello", "value": "world", "denyPrefix": "/admin"}`.

use serde::Deserialize;
use trellis_sdk::{Counter, Decision, Filter, LocalReply, Request, Response};

#[derive(Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Config {
    header: String,
    value: String,
    #[serde(default)]
    deny_prefix: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config { header: "x-hello".into(), value: "world".into(), deny_prefix: None }
    }
}

struct Hello {
    config: Config,
    requests: Counter,
    denied: Counter,
}

impl Filter for Hello {
    type Config = Config;

    fn new(config: &Config) -> Self {
        Hello {
            config: config.clone(),
            requests: Counter::define("hello_requests"),
            denied: Counter::define("hello_denied"),
        }
    }

    fn on_request(&mut self, req: &mut Request) -> Decision {
        self.requests.inc(1);
        if let Some(prefix) = &self.config.deny_prefix
            && req.path().starts_with(prefix.as_str())
        {
            self.denied.inc(1);
            let who = req.peer_principal().unwrap_or_else(|| "anonymous".into());
            return Decision::Reply(LocalReply::new(403).header("x-denied-by", "hello").body(format!("{who} may not")));
        }
        req.set_header(&self.config.header, &self.config.value);
        Decision::Continue
    }

    fn on_response(&mut self, resp: &mut Response) -> Decision {
        resp.set_header("x-hello-seen", &resp.status().to_string());
        Decision::Continue
    }
}

trellis_sdk::register!(Hello);
