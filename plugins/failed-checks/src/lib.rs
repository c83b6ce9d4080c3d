//! `failed-checks`: CyberArk PADR's rule. A backend is unhealthy once `failures` checks
//! failed within `window`; healthy again when the last check passed and fewer failures
//! remain in the window. Config: `{ "failures": 5, "window": "5m" }` (PADR's default).
use keyway_plugin_sdk::health::*;

struct FailedChecks {
    failures: usize,
    window_ms: u64,
}

fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like \"5m\""))?;
    let mult = match unit.trim() {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(format!("`{s}`: use a unit of ms, s, m or h")),
    };
    Ok(n * mult)
}

impl HealthPolicy for FailedChecks {
    fn configure(config: serde_json::Value) -> Result<Self, String> {
        let failures = match config.get("failures") {
            None => 5,
            Some(v) => v
                .as_u64()
                .filter(|n| *n >= 1)
                .ok_or_else(|| format!("`failures` must be >= 1, got {v}"))?
                as usize,
        };
        let window_ms = match config.get("window") {
            None => 300_000,
            Some(v) => {
                parse_duration_ms(v.as_str().ok_or("`window` must be a string like \"5m\"")?)?
            }
        };
        Ok(FailedChecks {
            failures,
            window_ms,
        })
    }

    fn evaluate(&self, _b: &Backend, current: Health, history: &[Probe], now: u64) -> Verdict {
        let failed = history
            .iter()
            .filter(|p| !p.ok && now.saturating_sub(p.at_ms) <= self.window_ms)
            .count();
        let last_ok = history.last().is_some_and(|p| p.ok);
        if failed >= self.failures {
            Verdict {
                health: Health::Unhealthy,
                reason: format!(
                    "{failed} failed checks within {} ms (limit {})",
                    self.window_ms, self.failures
                ),
            }
        } else if last_ok {
            Verdict {
                health: Health::Healthy,
                reason: format!("{failed} failed checks in the window"),
            }
        } else {
            Verdict {
                health: current,
                reason: String::new(),
            }
        }
    }
}

keyway_plugin_sdk::health_policy!(FailedChecks);
