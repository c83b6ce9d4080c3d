//! `rise-fall`: HAProxy's rule. `rise` passing checks in a row make a backend healthy,
//! `fall` failing checks in a row make it unhealthy; the first check decides an unknown
//! backend. Config: `{ "rise": 2, "fall": 3 }`.
use keyway_plugin_sdk::health::*;

struct RiseFall {
    rise: usize,
    fall: usize,
}

impl HealthPolicy for RiseFall {
    fn configure(config: serde_json::Value) -> Result<Self, String> {
        let get = |k: &str, d: u64| -> Result<usize, String> {
            match config.get(k) {
                None => Ok(d as usize),
                Some(v) => match v.as_u64() {
                    Some(n) if n >= 1 => Ok(n as usize),
                    _ => Err(format!("`{k}` must be a whole number >= 1, got {v}")),
                },
            }
        };
        Ok(RiseFall {
            rise: get("rise", 2)?,
            fall: get("fall", 3)?,
        })
    }

    fn evaluate(&self, _b: &Backend, current: Health, history: &[Probe], _now: u64) -> Verdict {
        let Some(last) = history.last() else {
            return Verdict {
                health: current,
                reason: String::new(),
            };
        };
        let streak = history.iter().rev().take_while(|p| p.ok == last.ok).count();
        let (health, reason) = match (last.ok, current) {
            (true, Health::Unhealthy) if streak >= self.rise => (
                Health::Healthy,
                format!("{streak} checks passed in a row (rise = {})", self.rise),
            ),
            (false, Health::Healthy | Health::Degraded) if streak >= self.fall => (
                Health::Unhealthy,
                format!("{streak} checks failed in a row (fall = {})", self.fall),
            ),
            (false, Health::Healthy) => (
                Health::Degraded,
                format!("{streak} failed check(s), fall = {}", self.fall),
            ),
            (true, Health::Degraded) => (Health::Healthy, "check passed".into()),
            (_, h) => (h, String::new()),
        };
        Verdict { health, reason }
    }
}

keyway_plugin_sdk::health_policy!(RiseFall);
