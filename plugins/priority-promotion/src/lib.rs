//! `priority-promotion`: keep a healthy primary; otherwise promote the first healthy
//! candidate in priority order (config order breaks ties), preferring `prefer_location`
//! when set. Config: `{ "prefer_location": "east" }` (optional).
use keyway_plugin_sdk::promotion::*;

struct Priority {
    prefer: Option<String>,
}

impl PromotionPolicy for Priority {
    fn configure(config: serde_json::Value) -> Result<Self, String> {
        let prefer = match config.get("prefer_location") {
            None => None,
            Some(v) => Some(
                v.as_str()
                    .ok_or("`prefer_location` must be a string")?
                    .to_string(),
            ),
        };
        Ok(Priority { prefer })
    }

    fn decide(&self, primary: Option<&Candidate>, candidates: &[Candidate], _now: u64) -> Decision {
        if primary.is_some_and(|p| p.health == Health::Healthy) {
            return Decision::Keep;
        }
        let mut healthy: Vec<(usize, &Candidate)> = candidates
            .iter()
            .enumerate()
            .filter(|(_, c)| c.health == Health::Healthy)
            .collect();
        healthy.sort_by_key(|(i, c)| {
            let preferred = self
                .prefer
                .as_deref()
                .is_some_and(|l| c.backend.location == l);
            (!preferred, c.backend.priority, *i)
        });
        match healthy.first() {
            Some((_, c)) => Decision::Promote(c.backend.id.clone()),
            None => Decision::None,
        }
    }
}

keyway_plugin_sdk::promotion_policy!(Priority);
