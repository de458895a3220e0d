//! Scenario registry: shared context, parameter defaults (full and smoke), dispatch.

pub mod api;
pub mod connect;
pub mod floor;
pub mod hold;
pub mod idle;
pub mod large;
pub mod pubsub;
pub mod s8;
pub mod soak;
pub mod swarm;

use std::time::Duration;

use anyhow::{Context as _, Result};
use serde_json::{json, Value};

use crate::conn::Target;
use crate::procfs::Server;

/// Knobs a user may override; None means "the scenario's default".
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub connections: Option<usize>,
    pub groups: Option<usize>,
    pub publishers: Option<usize>,
    pub rate: Option<f64>,
    pub duration_s: Option<f64>,
    pub size: Option<usize>,
    pub steps: Option<Vec<f64>>,
    pub concurrency: Option<usize>,
    pub iterations: Option<u64>,
    /// S8: global index of this loader process's first member (several processes share a run).
    pub first: Option<usize>,
    /// S8: this process also opens the publisher connection.
    pub publisher: bool,
}

/// Everything a scenario needs.
#[derive(Clone, Debug)]
pub struct Ctx {
    pub target: Option<Target>,
    pub server: Server,
    pub smoke: bool,
    pub o: Overrides,
    /// A1: the groupcast API listener and its key.
    pub api: Option<api::ApiTarget>,
}

impl Ctx {
    pub fn target(&self) -> Result<&Target> {
        self.target.as_ref().context("--addr is required for this scenario")
    }
    /// Pick the override, else the smoke default, else the full default.
    pub fn pick<T: Clone>(&self, over: &Option<T>, full: T, smoke: T) -> T {
        over.clone().unwrap_or(if self.smoke { smoke } else { full })
    }
    pub fn duration(&self, full_s: f64, smoke_s: f64) -> Duration {
        Duration::from_secs_f64(self.pick(&self.o.duration_s, full_s, smoke_s))
    }
    pub fn concurrency(&self) -> usize {
        self.pick(&self.o.concurrency, 256, 32)
    }
}

/// Scenario outcome: the JSON body and whether integrity held.
pub struct Outcome {
    pub ok: bool,
    pub body: Value,
}

/// Run scenario `name` ("s1".."s7", "t1".."t3" (wss://, the target carries TLS), "a1" (the
/// HTTP API, groupcast only), "soak" or "hold").
pub async fn run(name: &str, ctx: &Ctx) -> Result<Outcome> {
    match name {
        "s1" => pubsub::s1(ctx).await,
        "s2" => pubsub::s2(ctx).await,
        "s3" => idle::s3(ctx).await,
        "s4" => pubsub::s4(ctx).await,
        "s5" => connect::s5(ctx).await,
        "s6" => floor::s6(ctx).await,
        "s7" => large::s7(ctx).await,
        "t1" => connect::s5(ctx).await,
        "t2" => pubsub::t2(ctx).await,
        "t3" => idle::s3(ctx).await,
        "a1" => api::a1(ctx).await,
        "soak" => soak::soak(ctx).await,
        "hold" => hold::hold(ctx).await,
        "s8" => s8::s8(ctx).await,
        other => Ok(Outcome { ok: false, body: json!({ "error": format!("unknown scenario {other}") }) }),
    }
}
