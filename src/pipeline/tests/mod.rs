//! The pipeline, natively: every decision the e2e suite proves against Envoy, here with an
//! in-memory store, a fake clock and the exchange driven the way the skin drives it.

mod admission;
mod cache;
mod conversations;
mod dialects;
mod global;
mod global_faults;
mod identity;
mod refusals;
mod routing;
mod settlement;
mod strict_output;
mod tree;
mod users;
mod workers;

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;

use serde_json::{Value, json};

use super::{Effects, Gateway, Headers, Host, Request};
use crate::budget;
use crate::config::Config;
use crate::metrics::{Stat, StatUpdate};
use crate::reply::LocalReply;
use crate::store::{MemStore, SharedStore, Versioned};

/// 2026-11-28T10:00:00Z.
pub const T0: u64 = 1_795_860_000_000;

/// A host: one store (shared by the "workers" of one process), a clock, properties, stats.
pub struct Fake {
    pub store: Rc<MemStore>,
    pub clock: Cell<u64>,
    pub properties: RefCell<Vec<(Vec<String>, Vec<u8>)>>,
    pub stats: RefCell<Vec<StatUpdate>>,
    /// Webhook events posted (call token, body); a cluster named `missing` cannot be called.
    pub posts: RefCell<Vec<(u32, Vec<u8>)>>,
}

impl Fake {
    pub fn new() -> Fake {
        Fake::sharing(Rc::new(MemStore::default()))
    }

    /// Another worker of the same Envoy process: same shared data, own stats.
    pub fn sharing(store: Rc<MemStore>) -> Fake {
        Fake {
            store,
            clock: Cell::new(T0),
            properties: RefCell::new(Vec::new()),
            stats: RefCell::new(Vec::new()),
            posts: RefCell::new(Vec::new()),
        }
    }

    pub fn advance(&self, ms: u64) {
        self.clock.set(self.clock.get() + ms);
    }

    /// The sum of a counter's increments.
    pub fn counter(&self, stat: Stat) -> u64 {
        self.stats
            .borrow()
            .iter()
            .map(|u| match u {
                StatUpdate::Add(s, n) if *s == stat => *n,
                _ => 0,
            })
            .sum()
    }

    /// A gauge's last value.
    pub fn gauge(&self, stat: Stat) -> Option<u64> {
        self.stats.borrow().iter().rev().find_map(|u| match u {
            StatUpdate::Set(s, n) if *s == stat => Some(*n),
            _ => None,
        })
    }

    pub fn samples(&self, stat: Stat) -> Vec<u64> {
        self.stats
            .borrow()
            .iter()
            .filter_map(|u| match u {
                StatUpdate::Sample(s, n) if *s == stat => Some(*n),
                _ => None,
            })
            .collect()
    }
}

impl SharedStore for Fake {
    fn get(&self, key: &str) -> Versioned {
        self.store.get(key)
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), ()> {
        self.store.set(key, value, cas)
    }
}

impl Host for Fake {
    fn now_ms(&self) -> u64 {
        self.clock.get()
    }

    fn property(&self, path: &[String]) -> Option<Vec<u8>> {
        let properties = self.properties.borrow();
        properties
            .iter()
            .find(|(p, _)| p.as_slice() == path)
            .map(|(_, v)| v.clone())
    }

    fn stat(&self, update: StatUpdate) {
        self.stats.borrow_mut().push(update);
    }
}

impl super::Callouts for Fake {
    fn grpc(&self, _: &crate::global::GlobalBudgets, _: &[u8]) -> Option<u32> {
        None
    }

    fn post(&self, hooks: &crate::webhook::Webhooks, body: &[u8]) -> Option<u32> {
        let mut posts = self.posts.borrow_mut();
        let token = 1000 + u32::try_from(posts.len()).unwrap();
        (hooks.cluster != "missing").then(|| posts.push((token, body.to_vec())))?;
        Some(token)
    }
}

pub fn sha(key: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A configuration with API-key tenants `team-a` (`sk-a`) and `team-b` (`sk-b`) and `extra`
/// merged in at the top level.
pub fn config(extra: Value) -> Config {
    let mut base = json!({
        "identity": {"source": "api_key", "api_keys": [
            {"sha256": sha("sk-a"), "tenant": "team-a"},
            {"sha256": sha("sk-b"), "tenant": "team-b"}]},
        "tenants": {"team-a": {}, "team-b": {}},
        "prices": {"gpt-4o-mini": {"input": "0.15", "output": "0.60"},
                   "claude-3-5-haiku": {"input": "0.80", "output": "4.00"}},
    });
    if let (Some(base), Value::Object(extra)) = (base.as_object_mut(), extra) {
        base.extend(extra);
    }
    Config::from_json(&serde_json::to_vec(&base).unwrap()).unwrap()
}

pub fn gateway(extra: Value) -> Gateway {
    Gateway::new(config(extra), 0, "w1".to_string())
}

/// A client request.
#[derive(Clone)]
pub struct Call {
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

impl Call {
    pub fn post(path: &str, key: Option<&str>, body: Value) -> Call {
        let mut headers = vec![
            (":path".to_string(), path.as_bytes().to_vec()),
            (":method".to_string(), b"POST".to_vec()),
            ("content-type".to_string(), b"application/json".to_vec()),
        ];
        if let Some(key) = key {
            headers.push((
                "authorization".to_string(),
                format!("Bearer {key}").into_bytes(),
            ));
        }
        Call {
            headers,
            body: serde_json::to_vec(&body).unwrap(),
        }
    }

    /// A chat completion for `team-a`.
    pub fn chat(body: Value) -> Call {
        Call::post("/v1/chat/completions", Some("sk-a"), body)
    }

    pub fn header(mut self, name: &str, value: &str) -> Call {
        self.headers.retain(|(n, _)| n != name);
        self.headers
            .push((name.to_string(), value.as_bytes().to_vec()));
        self
    }

    pub fn raw_body(mut self, body: &[u8]) -> Call {
        self.body = body.to_vec();
        self
    }
}

/// What the upstream answers (or does not).
#[derive(Clone)]
pub struct Upstream {
    pub status: u32,
    pub content_type: &'static str,
    pub chunks: Vec<Vec<u8>>,
    /// The response reached its end (`false`: the client left or the upstream reset).
    pub complete: bool,
    /// Envoy's `response.code_details` at `on_log`.
    pub details: Option<&'static str>,
}

impl Upstream {
    pub fn json(body: Value) -> Upstream {
        Upstream {
            status: 200,
            content_type: "application/json",
            chunks: vec![serde_json::to_vec(&body).unwrap()],
            complete: true,
            details: None,
        }
    }

    /// An OpenAI chat answer with this usage.
    pub fn chat(input: u64, output: u64) -> Upstream {
        Upstream::json(json!({
            "id": "c1", "object": "chat.completion", "model": "gpt-4o-mini",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": input, "completion_tokens": output,
                      "total_tokens": input + output}}))
    }

    /// An SSE stream of `events` (each a JSON object), then `[DONE]`.
    pub fn sse(events: &[Value]) -> Upstream {
        let mut chunks: Vec<Vec<u8>> = events
            .iter()
            .map(|e| format!("data: {e}\n\n").into_bytes())
            .collect();
        chunks.push(b"data: [DONE]\n\n".to_vec());
        Upstream {
            status: 200,
            content_type: "text/event-stream",
            chunks,
            complete: true,
            details: None,
        }
    }

    pub fn status(mut self, status: u32) -> Upstream {
        self.status = status;
        self
    }

    /// Cut after `n` chunks, with these response details at `on_log`.
    pub fn cut(mut self, n: usize, details: &'static str) -> Upstream {
        self.chunks.truncate(n);
        self.complete = false;
        self.details = Some(details);
        self
    }
}

/// Everything the host was asked to do for one exchange.
#[derive(Default, Debug)]
pub struct Trace {
    pub reply: Option<LocalReply>,
    /// Headers added to the local reply.
    pub reply_headers: Vec<(String, Option<Vec<u8>>)>,
    /// The request went upstream (not answered locally, not passed through untouched).
    pub forwarded: bool,
    /// Passed through without Tollgate.
    pub passed: bool,
    pub request_edits: Vec<(String, Option<Vec<u8>>)>,
    /// The body that went upstream.
    pub upstream_body: Vec<u8>,
    pub rerouted: bool,
    pub response_edits: Vec<(String, Option<Vec<u8>>)>,
    /// What the client received of the upstream's body.
    pub client_body: Vec<u8>,
    pub record: BTreeMap<String, String>,
    /// How many times a record was written (exactly once for every request Tollgate took).
    pub records: usize,
    /// Parked, waiting for a global lease's refill.
    pub waiting: bool,
    /// `:path` as replaced before anything else (a Gemini `?key=` cut from it).
    pub request_path: Option<Vec<u8>>,
}

impl Trace {
    pub fn status(&self) -> u32 {
        self.reply.as_ref().map_or(0, |r| r.status)
    }

    pub fn reply_json(&self) -> Value {
        serde_json::from_slice(&self.reply.as_ref().unwrap().body).unwrap()
    }

    pub fn reply_header(&self, name: &str) -> Option<String> {
        let reply = self.reply.as_ref()?;
        reply
            .headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.clone())
            .or_else(|| edit(&self.reply_headers, name))
    }

    pub fn request_edit(&self, name: &str) -> Option<String> {
        edit(&self.request_edits, name)
    }

    pub fn response_edit(&self, name: &str) -> Option<String> {
        edit(&self.response_edits, name)
    }

    pub fn field(&self, name: &str) -> &str {
        self.record
            .get(&format!("tollgate.{name}"))
            .map_or("", String::as_str)
    }

    pub fn upstream_json(&self) -> Value {
        serde_json::from_slice(&self.upstream_body).unwrap()
    }

    fn take(&mut self, effects: Effects<'_>) {
        let map_path = effects.header_map.as_ref().and_then(|m| m.get(":path"));
        let edited = effects.headers.iter().find(|(n, _)| *n == ":path");
        if let Some(path) = map_path.or(edited.and_then(|(_, v)| v.as_deref())) {
            self.request_path.get_or_insert_with(|| path.to_vec());
        }
        take_record(self, effects.record);
        let edits = effects.headers.into_iter().map(|(n, v)| (n.to_string(), v));
        if let Some(reply) = effects.reply {
            self.reply = Some(reply);
            self.reply_headers.extend(edits);
        } else {
            self.request_edits.extend(edits);
        }
        self.rerouted |= effects.clear_route_cache;
        if let Some(body) = effects.body {
            self.upstream_body = body;
        }
    }
}

fn edit(edits: &[(String, Option<Vec<u8>>)], name: &str) -> Option<String> {
    edits
        .iter()
        .rev()
        .find(|(n, _)| n == name)
        .and_then(|(_, v)| v.as_ref())
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// An exchange between its request and its response (for interleaving workers).
pub struct Open {
    pub request: Request,
    pub trace: Trace,
    pub ticket: u32,
}

/// Sends the request through the pipeline; stops before the upstream answers.
pub fn open(gateway: &Gateway, host: &Fake, call: &Call) -> Open {
    thread_local!(static TICKETS: Cell<u32> = const { Cell::new(1) });
    let ticket = TICKETS.with(|t| t.replace(t.get() + 1));
    let mut request = Request::with_ticket(ticket);
    let mut trace = Trace {
        upstream_body: call.body.clone(),
        ..Trace::default()
    };
    let headers = Headers(call.headers.clone());
    let effects = request.on_request_headers(gateway, host, headers, call.body.is_empty());
    let pause = effects.pause;
    let replied = effects.reply.is_some();
    trace.take(effects);
    if !pause {
        trace.passed = true;
    } else if !replied {
        // The body in two callbacks, as Envoy delivers large bodies.
        let half = call.body.len() / 2;
        let first = request.on_request_body(gateway, host, half, false, || {
            panic!("the body is read once, at its end")
        });
        assert!(first.pause);
        if first.reply.is_some() {
            trace.take(first);
        } else {
            let body = call.body.clone();
            let effects = request.on_request_body(gateway, host, body.len(), true, || body);
            if let Some(map) = &effects.header_map {
                // The whole map goes back: the client's headers with the edits applied.
                for (name, value) in &effects.headers {
                    assert_eq!(map.get(name), value.as_deref(), "{name}");
                }
                if !effects.headers.iter().any(|(n, _)| *n == ":path") {
                    let sent = trace.request_path.clone();
                    let client = Headers(call.headers.clone());
                    assert_eq!(map.get(":path"), sent.as_deref().or(client.get(":path")));
                }
            }
            let replied = effects.reply.is_some();
            let waiting = effects.wait;
            assert!(!waiting || effects.pause, "a waiting request is paused");
            trace.take(effects);
            trace.waiting = waiting;
            trace.forwarded = !replied && !waiting;
        }
    }
    Open {
        request,
        trace,
        ticket,
    }
}

/// A waiting request's refill ended: it is admitted again (or refused).
pub fn resume(gateway: &Gateway, host: &Fake, open: &mut Open, refilled: super::Refilled) {
    assert!(open.trace.waiting, "only a waiting request resumes");
    let effects = open.request.resume(gateway, host, refilled);
    let replied = effects.reply.is_some();
    let waiting = effects.wait;
    open.trace.take(effects);
    open.trace.waiting = waiting;
    open.trace.forwarded = !replied && !waiting;
}

/// The upstream answers (or fails) and the exchange ends with `on_log`.
pub fn close(gateway: &Gateway, host: &Fake, open: Open, upstream: Option<&Upstream>) -> Trace {
    let Open {
        mut request,
        mut trace,
        ..
    } = open;
    if let (true, Some(up)) = (trace.forwarded && request.is_active(), upstream) {
        let head = Headers(vec![
            (":status".to_string(), up.status.to_string().into_bytes()),
            (
                "content-type".to_string(),
                up.content_type.as_bytes().to_vec(),
            ),
            ("content-length".to_string(), b"100".to_vec()),
        ]);
        let no_body = up.chunks.is_empty() && up.complete;
        let effects = request.on_response_headers(gateway, host, head, no_body);
        if let Some(map) = &effects.header_map {
            // The whole map comes back, edited as the edits say.
            for (name, value) in &effects.headers {
                assert_eq!(map.get(name), value.as_deref(), "{name}");
            }
            assert_eq!(map.get(":status"), Some(up.status.to_string().as_bytes()));
        }
        trace.response_edits.extend(
            effects
                .headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.clone())),
        );
        take_record(&mut trace, effects.record);
        let last = up.chunks.len();
        for (i, chunk) in up.chunks.iter().enumerate() {
            let end = up.complete && i + 1 == last;
            let seen: &[u8] = if request.wants_response_body() {
                chunk
            } else {
                &[]
            };
            let effects = request.on_response_body(gateway, host, chunk.len(), seen, end);
            let delivered = effects.body.unwrap_or_else(|| chunk.clone());
            trace.client_body.extend_from_slice(&delivered);
            take_record(&mut trace, effects.record);
        }
    }
    if let Some(details) = upstream.and_then(|u| u.details) {
        host.properties.borrow_mut().push((
            vec!["response".to_string(), "code_details".to_string()],
            details.as_bytes().to_vec(),
        ));
    }
    let effects = request.on_log(gateway, host);
    take_record(&mut trace, effects.record);
    host.properties.borrow_mut().clear();
    // `on_log` again (Envoy calls it once; the pipeline must not care).
    let again = request.on_log(gateway, host);
    assert!(again.record.is_empty(), "a second record");
    trace
}

fn take_record(trace: &mut Trace, record: crate::ledger::Record) {
    if !record.is_empty() {
        trace.records += 1;
        // Every record, whatever the request, is one typed JSON object's members.
        let line = format!("{{{}\"end\":0}}", crate::ledger::encode(&record));
        let typed: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(typed["ledger_version"], 1, "{line}");
        for (name, value) in record {
            trace
                .record
                .insert(name.to_string(), value.plain().into_owned());
        }
    }
}

/// One whole exchange.
pub fn run(gateway: &Gateway, host: &Fake, call: &Call, upstream: Option<&Upstream>) -> Trace {
    let open = open(gateway, host, call);
    close(gateway, host, open, upstream)
}

/// What a tenant's limit has used and holds reserved, now.
pub fn bucket(gateway: &Gateway, host: &Fake, tenant: &str, limit: &str) -> (u64, u64) {
    let (policy, keys) = gateway.tenant_budget(tenant);
    let i = policy.limits.iter().position(|l| l.name == limit).unwrap();
    let now = host.now_ms();
    let b = budget::read(
        host,
        &keys.buckets[i],
        &policy.limits[i],
        now,
        policy.epoch(now),
    );
    (b.used, b.reserved())
}
