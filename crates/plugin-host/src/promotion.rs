//! The `promotion` world: which backend becomes primary when the primary is lost. A
//! policy instantiates per call; a `promote` naming no candidate is refused as an
//! unusable answer, so a plugin can never promote a backend it was not offered.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::bindings;
use crate::engine::PluginState;
use crate::error::PluginError;
use crate::load::{configured_for_call, load_world};
use crate::meta::{PluginMeta, Traced};

/// A loaded promotion-policy plugin.
pub struct PromotionPlugin {
    /// Facts for `/status`.
    pub meta: PluginMeta,
    pre: bindings::promotion::PromotionPre<PluginState>,
}

/// A candidate for promotion, in the host's terms.
#[derive(Clone, Debug)]
pub struct PromotionCandidate {
    /// Backend id.
    pub id: String,
    /// Its priority.
    pub priority: u32,
    /// Its location label.
    pub location: String,
    /// Its `weight`.
    pub weight: u32,
    /// Healthy.
    pub healthy: bool,
    /// Degraded (a standby: promoted only when no candidate is healthy). Ignored when
    /// `healthy`.
    pub degraded: bool,
    /// Last reported lag.
    pub lag_ms: Option<u64>,
    /// Last passing check, Unix milliseconds (0: never).
    pub last_ok_ms: u64,
}

/// A promotion decision, in the host's terms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PromotionDecision {
    /// Keep the current primary.
    Keep,
    /// Promote this backend id (checked to be a candidate).
    Promote(String),
    /// No acceptable candidate.
    None,
}

impl PromotionPlugin {
    /// Compiles, links and configures the plugin at `path` with `config` (JSON).
    pub fn load(path: &Path, config: &str) -> Result<Arc<Self>, String> {
        let (meta, pre) = load_world::<bindings::promotion::Promotion>(path, config)?;
        Ok(Arc::new(Self { meta, pre }))
    }

    /// Asks the policy for a decision. A `promote` naming no candidate is rejected.
    /// `now_ms` is Unix milliseconds, like every candidate's `last_ok_ms`.
    pub fn decide(
        &self,
        primary: Option<&PromotionCandidate>,
        candidates: &[PromotionCandidate],
        now_ms: u64,
    ) -> Result<PromotionDecision, PluginError> {
        self.decide_traced(primary, candidates, now_ms).result
    }

    /// [`Self::decide`], with what the plugin wrote to stdout and stderr.
    pub fn decide_traced(
        &self,
        primary: Option<&PromotionCandidate>,
        candidates: &[PromotionCandidate],
        now_ms: u64,
    ) -> Traced<PromotionDecision> {
        use bindings::promotion::exports::keyway::policy::promotion_policy as p;
        use bindings::promotion::keyway::policy::types as t;
        self.meta.calls.fetch_add(1, Ordering::Relaxed);
        let convert = |c: &PromotionCandidate, role: t::Role| p::Candidate {
            backend: t::Backend {
                id: c.id.clone(),
                role,
                priority: c.priority,
                location: c.location.clone(),
                weight: c.weight,
            },
            health: if c.healthy {
                t::Health::Healthy
            } else if c.degraded {
                t::Health::Degraded
            } else {
                t::Health::Unhealthy
            },
            lag_ms: c.lag_ms,
            last_ok_ms: c.last_ok_ms,
        };
        let mut output = String::new();
        let result = (|| {
            let (mut store, inst) = configured_for_call::<bindings::promotion::Promotion>(
                &self.pre,
                &self.meta.config,
            )?;
            let api = inst.keyway_policy_promotion_policy();
            let prim = primary.map(|c| convert(c, t::Role::Primary));
            let cands: Vec<p::Candidate> = candidates
                .iter()
                .map(|c| convert(c, t::Role::Replica))
                .collect();
            let called = api.call_decide(&mut store, prim.as_ref(), &cands, now_ms);
            output = store.data().out.text();
            let d = called.map_err(|e| PluginError::from_call(e, &store))?;
            Ok(match d {
                p::Decision::Keep => PromotionDecision::Keep,
                p::Decision::None => PromotionDecision::None,
                p::Decision::Promote(id) if candidates.iter().any(|c| c.id == id) => {
                    PromotionDecision::Promote(id)
                }
                p::Decision::Promote(id) => {
                    return Err(PluginError::InvalidOutput(format!(
                        "promote(\"{id}\") names no candidate"
                    )))
                }
            })
        })();
        let traced = Traced { result, output };
        self.meta.record(&traced);
        traced
    }
}
