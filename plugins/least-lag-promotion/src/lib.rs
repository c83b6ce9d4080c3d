//! `least-lag-promotion`: keep a healthy primary; otherwise promote the healthy candidate
//! with the least replication lag (candidates that report none come last, then priority
//! order). `max_lag_ms` excludes candidates too far behind to promote safely.
//! Config: `{ "max_lag_ms": 10000 }` (optional).
use keyway_plugin_sdk::promotion::*;

struct LeastLag {
    max_lag_ms: Option<u64>,
}

impl PromotionPolicy for LeastLag {
    fn configure(config: serde_json::Value) -> Result<Self, String> {
        let max_lag_ms = match config.get("max_lag_ms") {
            None => None,
            Some(v) => Some(
                v.as_u64()
                    .ok_or("`max_lag_ms` must be a whole number of milliseconds")?,
            ),
        };
        Ok(LeastLag { max_lag_ms })
    }

    fn decide(&self, primary: Option<&Candidate>, candidates: &[Candidate], _now: u64) -> Decision {
        if primary.is_some_and(|p| p.health == Health::Healthy) {
            return Decision::Keep;
        }
        let best = candidates
            .iter()
            .enumerate()
            .filter(|(_, c)| c.health == Health::Healthy)
            .filter(|(_, c)| match (self.max_lag_ms, c.lag_ms) {
                (Some(max), Some(lag)) => lag <= max,
                (Some(_), None) => false,
                (None, _) => true,
            })
            .min_by_key(|(i, c)| (c.lag_ms.unwrap_or(u64::MAX), c.backend.priority, *i));
        match best {
            Some((_, c)) => Decision::Promote(c.backend.id.clone()),
            None => Decision::None,
        }
    }
}

keyway_plugin_sdk::promotion_policy!(LeastLag);
