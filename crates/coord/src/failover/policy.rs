//! Choosing a new primary: the candidates the promotion policy sees, the native
//! `priority-promotion` and `least-lag-promotion`, and a plugin's choice checked.
//! It never picks a fenced, unhealthy or (while a healthy one exists) degraded backend.

use super::*;

/// Asks the promotion policy for a candidate: healthy (degraded only when no candidate
/// is healthy), not fenced, not the primary, not one whose promote hook just failed.
/// `plugin` is the compiled plugin of a plugin policy (without it: no promotion).
pub(super) fn choose(
    view: &ClusterView,
    t: &Topology,
    hook_failed: &HashMap<String, Instant>,
    plugin: Option<&keyway_plugin_host::PromotionPlugin>,
) -> Option<usize> {
    let c = &view.cfg;
    let candidates: Vec<PromotionCandidate> = c
        .backends
        .iter()
        .enumerate()
        .filter(|(i, b)| {
            Some(&b.id) != t.primary.as_ref()
                && !t.fenced.contains(&b.id)
                && !hook_failed.contains_key(&b.id)
                && view.backends.get(*i).is_some()
        })
        .map(|(i, b)| candidate(b, &view.backends[i]))
        .collect();
    let policy = c.promotion.as_ref()?;
    let decision = match &policy.policy {
        PromotionPolicyKind::Priority { prefer_location } => {
            native_priority(&candidates, prefer_location.as_deref())
        }
        PromotionPolicyKind::LeastLag { max_lag_ms } => native_least_lag(&candidates, *max_lag_ms),
        PromotionPolicyKind::Plugin { on_error, .. } => {
            let plugin = plugin?;
            // The primary as the policy should see it: named, with its (bad) health.
            let primary = t
                .primary
                .as_ref()
                .and_then(|id| index(c, id))
                .map(|i| candidate(&c.backends[i], &view.backends[i]));
            match plugin.decide(
                primary.as_ref(),
                &candidates,
                crate::unix_ms(SystemTime::now()),
            ) {
                Ok(d) => d,
                Err(e) => match on_error {
                    OnError::FailClosed => {
                        tracing::warn!(cluster = %c.name, error = %e, "promotion plugin failed; no promotion (on_error = fail-closed)");
                        PromotionDecision::None
                    }
                    _ => native_priority(&candidates, None),
                },
            }
        }
    };
    match decision {
        PromotionDecision::Promote(id) => {
            let chosen = candidates.iter().find(|c| c.id == id)?;
            if !chosen.healthy && !chosen.degraded {
                tracing::warn!(cluster = %c.name, backend = %id, "the promotion policy chose an unhealthy backend; refused");
                return None;
            }
            if !chosen.healthy && candidates.iter().any(|c| c.healthy) {
                tracing::warn!(cluster = %c.name, backend = %id, "the promotion policy chose a degraded backend while a candidate is healthy; refused");
                return None;
            }
            index(c, &id)
        }
        PromotionDecision::Keep | PromotionDecision::None => None,
    }
}

/// A backend as the promotion policy sees it. `last_ok_ms` is the WIT's
/// `candidate.last-ok-ms`: Unix milliseconds by the clock of `now-ms` and of the probes'
/// `at-ms`, unchanged by reloads.
fn candidate(b: &BackendConfig, s: &BackendState) -> PromotionCandidate {
    PromotionCandidate {
        id: b.id.clone(),
        priority: b.priority,
        location: b.location.clone(),
        weight: b.weight,
        healthy: s.health == BackendHealth::Healthy,
        degraded: s.health == BackendHealth::Degraded,
        lag_ms: s.lag_ms,
        last_ok_ms: s.last_ok_ms,
    }
}

/// The instant keyway started (first use).
pub(super) fn started() -> Instant {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *START.get_or_init(Instant::now)
}

/// Native `priority-promotion`: the first healthy candidate by priority (config order
/// breaks ties), those at `prefer` first; a degraded one only when none is healthy.
pub fn native_priority(cands: &[PromotionCandidate], prefer: Option<&str>) -> PromotionDecision {
    cands
        .iter()
        .enumerate()
        .filter(|(_, c)| c.healthy || c.degraded)
        .min_by_key(|(i, c)| {
            (
                !c.healthy,
                prefer.is_some_and(|p| c.location != p),
                c.priority,
                *i,
            )
        })
        .map_or(PromotionDecision::None, |(_, c)| {
            PromotionDecision::Promote(c.id.clone())
        })
}

/// Native `least-lag-promotion`: the healthy candidate with the least reported lag
/// (none reported: last; then priority), never one beyond `max_lag_ms`; a degraded one
/// only when none is healthy.
pub fn native_least_lag(
    cands: &[PromotionCandidate],
    max_lag_ms: Option<u64>,
) -> PromotionDecision {
    cands
        .iter()
        .enumerate()
        .filter(|(_, c)| c.healthy || c.degraded)
        .filter(|(_, c)| max_lag_ms.is_none_or(|m| c.lag_ms.is_some_and(|l| l <= m)))
        .min_by_key(|(i, c)| {
            (
                !c.healthy,
                c.lag_ms.is_none(),
                c.lag_ms.unwrap_or(u64::MAX),
                c.priority,
                *i,
            )
        })
        .map_or(PromotionDecision::None, |(_, c)| {
            PromotionDecision::Promote(c.id.clone())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(
        id: &str,
        priority: u32,
        loc: &str,
        healthy: bool,
        lag: Option<u64>,
    ) -> PromotionCandidate {
        PromotionCandidate {
            id: id.into(),
            priority,
            location: loc.into(),
            weight: 1,
            healthy,
            degraded: false,
            lag_ms: lag,
            last_ok_ms: 0,
        }
    }

    #[test]
    fn native_policies_choose_as_documented() {
        let c = [
            cand("a", 2, "west", true, Some(5)),
            cand("b", 1, "east", false, Some(0)),
            cand("c", 1, "west", true, None),
            cand("d", 3, "east", true, Some(50)),
        ];
        let p = |id: &str| PromotionDecision::Promote(id.into());
        assert_eq!(native_priority(&c, None), p("c"));
        assert_eq!(native_priority(&c, Some("east")), p("d"));
        assert_eq!(native_least_lag(&c, None), p("a"));
        assert_eq!(native_least_lag(&c, Some(1)), PromotionDecision::None);
        assert_eq!(native_priority(&c[1..2], None), PromotionDecision::None);
    }
}
