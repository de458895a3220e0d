//! What each endpoint does once its request is whole (routes.rs has picked it): answer at
//! once, publish on the bus and answer when the bus has numbered the message, or ask the
//! master and turn its answer line into the response.

use std::time::{Duration, Instant};

use super::conn::Phase;
use super::errors::ApiError;
use super::http::Response;
use super::master_query::{Answer, Purpose};
use super::publish::{self, Answered};
use super::routes::Route;
use super::{metrics, ApiServer};
use crate::control::StatusReport;
use crate::worker::bus::BusEvent;

impl ApiServer {
    pub(super) fn serve(&mut self, key: usize, route: Route, body: &[u8]) {
        let Some(conn) = self.conns.get_mut(key) else { return };
        let who = (key, conn.serial);
        let ask = |purpose: Purpose, line: String| (purpose, line);
        let question = match route {
            Route::Health => return self.answer(key, &Response::json(200, br#"{"ok":true}"#.to_vec())),
            Route::Demo(response) => return self.answer(key, &response),
            Route::Publish { .. } => return self.publish(key, body),
            Route::Ready => ask(Purpose::Ready, "status".into()),
            Route::Metrics => ask(Purpose::Metrics, "status".into()),
            Route::Connections => ask(Purpose::Connections, "connections".into()),
            Route::Group(group) => {
                let quoted = serde_json::Value::from(group).to_string();
                ask(Purpose::Group, format!("group {quoted}"))
            }
            Route::Close { id, code, reason } => {
                let quoted = serde_json::Value::from(reason).to_string();
                ask(Purpose::Close { id }, format!("close {id} {code} {quoted}"))
            }
        };
        conn.phase = Phase::Waiting;
        let (purpose, line) = question;
        let failed = self.queries.ask(self.poll.registry(), who, purpose, line);
        self.master_answered(failed);
    }

    pub(super) fn publish(&mut self, key: usize, body: &[u8]) {
        let limits = self.config.limits.clone();
        let parsed = match publish::parse(body, &limits) {
            Ok(p) => p,
            Err(e) => return self.answer(key, &e.response()),
        };
        if !self.bus.counters().connected {
            return self.answer(key, &ApiError::BusUnavailable.response());
        }
        if !self.bucket.take(parsed.groups.len(), Instant::now()) {
            self.stats.api_rate_limited += 1;
            return self.answer(key, &ApiError::RateLimited.response());
        }
        let seqs: Vec<u64> =
            parsed.groups.iter().map(|g| self.bus.publish(g, parsed.kind, parsed.message.as_bytes(), false)).collect();
        self.stats.published += seqs.len() as u64;
        let Some(conn) = self.conns.get_mut(key) else { return };
        conn.phase = Phase::Waiting;
        let timeout = Duration::from_millis(self.config.api.publish_timeout_ms);
        self.waiters.wait((key, conn.serial), &parsed.groups, &seqs, parsed.several, timeout);
    }

    pub(super) fn publish_answered(&mut self, answered: Answered) {
        let response = match answered.result {
            Ok(body) => Response::json(200, body),
            Err(e) => e.response(),
        };
        self.answer_later(answered.conn, &response);
    }

    pub(super) fn bus_ready(&mut self) {
        let mut stamps = Vec::new();
        self.bus.on_ready(self.poll.registry(), &mut self.scratch, |event| {
            if let BusEvent::Stamped { seq, offset } = event {
                stamps.push((seq, offset));
            }
        });
        for (seq, offset) in stamps {
            if let Some(answered) = self.waiters.stamped(seq, offset) {
                self.publish_answered(answered);
            }
        }
    }

    pub(super) fn master_answered(&mut self, answers: Vec<Answer>) {
        for answer in answers {
            let response = match answer.line {
                Err(why) => ApiError::MasterUnavailable(why).response(),
                Ok(line) if line.starts_with(b"error ") => {
                    ApiError::Internal(String::from_utf8_lossy(&line["error ".len()..]).into_owned()).response()
                }
                Ok(line) => self.master_response(&answer.purpose, line),
            };
            self.answer_later(answer.conn, &response);
        }
    }

    /// Turns the master's answer line into the endpoint's response.
    fn master_response(&self, purpose: &Purpose, line: Vec<u8>) -> Response {
        let report = || -> Result<StatusReport, ApiError> {
            serde_json::from_slice(&line).map_err(|e| ApiError::Internal(format!("unreadable status: {e}")))
        };
        let result = match purpose {
            Purpose::Connections | Purpose::Group => Ok(Response::json(200, line)),
            Purpose::Metrics => report().and_then(|r| {
                let text = metrics::render(&r).map_err(|e| ApiError::Internal(format!("{e:#}")))?;
                Ok(Response {
                    status: 200,
                    content_type: metrics::CONTENT_TYPE,
                    body: text.into_bytes(),
                    headers: Vec::new(),
                    close: false,
                })
            }),
            Purpose::Ready => report().map(|r| self.readiness(&r)),
            Purpose::Close { id } => match serde_json::from_slice::<serde_json::Value>(&line) {
                Ok(v) if v["closed"] == true => {
                    Ok(Response::json(200, format!("{{\"ok\":true,\"id\":{id}}}").into_bytes()))
                }
                Ok(v) if v["missing_workers"].as_array().is_some_and(|m| !m.is_empty()) => {
                    Err(ApiError::MasterUnavailable(format!("workers {} did not answer", v["missing_workers"])))
                }
                Ok(_) => Err(ApiError::NotFound(format!("no connection {id}"))),
                Err(e) => Err(ApiError::Internal(format!("unreadable answer: {e}"))),
            },
        };
        result.unwrap_or_else(|e| e.response())
    }

    /// `/ready`: every worker index has a process that serves and reaches the bus, and so
    /// does this process's own bus.
    fn readiness(&self, report: &StatusReport) -> Response {
        let serving = |state: &str| matches!(state, "running" | "handing_off" | "receiving");
        let mut missing = Vec::new();
        for index in 0..report.workers {
            let ok = report
                .processes
                .iter()
                .any(|p| p.role == "worker" && p.index == Some(index) && serving(&p.state) && p.channel_connected);
            if !ok {
                missing.push(format!("worker-{index}"));
            }
        }
        if !self.bus.counters().connected {
            missing.push("the api's bus".into());
        }
        if missing.is_empty() {
            Response::json(200, br#"{"ready":true}"#.to_vec())
        } else {
            let detail = format!("not serving or not on the bus: {}", missing.join(", "));
            let body = serde_json::json!({ "ready": false, "error": "not_ready", "detail": detail });
            Response::json(503, body.to_string().into_bytes())
        }
    }
}
