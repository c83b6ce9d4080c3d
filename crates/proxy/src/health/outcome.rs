//! How results change a backend's health: an active probe judged by the cluster's
//! policy (`record_probe`, on a copy of the history, never with the lock held across a
//! plugin call) and a passive report from the request path with outlier ejection and
//! its growing back-off (`report`). It never routes a request and never probes.

use super::*;

impl ClusterHealth {
    /// Records an active probe of backend `i` and re-evaluates it. The policy judges a
    /// copy of the history without the lock held (the passive path on the request path
    /// takes it); the probes of one backend come one at a time from its prober.
    pub fn record_probe(&self, i: usize, probe: Probe) {
        let now = probe.at;
        let ok = probe.ok;
        let (backend, current, history) = {
            let Ok(mut records) = self.records.lock() else {
                return;
            };
            let Some(r) = records.get_mut(i) else { return };
            // Every probe sets the lag: a check that failed or stopped reporting lag
            // makes it unknown, never leaves an old value standing.
            let lag_changed = r.lag_ms != probe.lag_ms;
            r.lag_ms = probe.lag_ms;
            if r.history.len() == HISTORY {
                r.history.pop_front();
            }
            r.history.push_back(probe);
            if lag_changed {
                self.publish(&records);
            }
            let r = &records[i];
            // The policy sees the backend as it is now: its current role.
            let mut backend = self.backend_cfgs[i].clone();
            backend.role = r.role;
            (backend, r.health, r.history.clone())
        };
        let (to, reason) = self.policy.evaluate(&backend, current, &history, now);
        let Ok(mut records) = self.records.lock() else {
            return;
        };
        let Some(r) = records.get_mut(i) else { return };
        let at = SystemTime::now();
        r.verdict = Some((to, reason.clone(), at));
        let mut changed = false;
        if to != r.health {
            self.transition(i, r, to, reason);
            changed = true;
        } else if !reason.is_empty() {
            r.reason = reason;
            r.reason_at = at;
        }
        // An ejected backend returns through a passing probe once its ejection is over.
        if let Some(until) = r.ejected_until {
            if ok && now >= until {
                r.ejected_until = None;
                r.reason = "ejection over and a probe passed".into();
                r.reason_at = at;
                self.consecutive[i].store(0, Ordering::Relaxed);
                tracing::info!(cluster = %self.cluster, backend = %self.ids[i], "backend returns after ejection");
                changed = true;
            }
        }
        if changed {
            self.publish(&records);
        }
    }

    /// Reports the outcome of a live request to backend `i`: `false` for a failure that
    /// was the backend's ([`Fault::Backend`]), `true` for an answer that was not.
    pub fn report(&self, i: usize, ok: bool) {
        let Some(c) = self.consecutive.get(i) else {
            return;
        };
        if ok {
            if c.load(Ordering::Relaxed) != 0 {
                c.store(0, Ordering::Relaxed);
                if let Ok(mut records) = self.records.lock() {
                    if let Some(r) = records.get_mut(i).filter(|r| r.kept_in_panic) {
                        r.kept_in_panic = false;
                        self.publish(&records);
                    }
                }
            }
            return;
        }
        let n = c.fetch_add(1, Ordering::Relaxed) + 1;
        let limit = self.outlier.consecutive_failures;
        if limit == 0 || n < limit {
            return;
        }
        let Ok(mut records) = self.records.lock() else {
            return;
        };
        let now = Instant::now();
        if records[i].ejected_until.is_some_and(|u| u > now) {
            return;
        }
        // The last usable backend of its role stays: panic mode.
        let role = records[i].role;
        let others = records
            .iter()
            .enumerate()
            .filter(|(j, r)| {
                *j != i
                    && r.role == role
                    && !r.fenced
                    && matches!(r.health, Health::Healthy | Health::Degraded)
                    && r.ejected_until
                        .is_none_or(|u| self.active.is_none() && u <= now)
            })
            .count();
        if others == 0 {
            if !records[i].kept_in_panic {
                records[i].kept_in_panic = true;
                tracing::warn!(
                    cluster = %self.cluster,
                    backend = %self.ids[i],
                    failures = n,
                    "panic mode: not ejecting the last usable backend of its role; still routing to it"
                );
                self.publish(&records);
            }
            return;
        }
        let r = &mut records[i];
        if r.last_ejection
            .is_some_and(|t| now.duration_since(t) > self.outlier.max_ejection * 2)
        {
            r.ejections = 0;
        }
        r.ejections += 1;
        let factor = 1u32 << (r.ejections - 1).min(16);
        let length = self
            .outlier
            .base_ejection
            .saturating_mul(factor)
            .min(self.outlier.max_ejection);
        r.ejected_until = Some(now + length);
        r.last_ejection = Some(now);
        r.kept_in_panic = false;
        r.reason = format!(
            "ejected for {} after {n} consecutive failures",
            humantime::format_duration(length)
        );
        r.reason_at = SystemTime::now();
        c.store(0, Ordering::Relaxed);
        self.metrics[i].ejections.increment(1);
        tracing::warn!(cluster = %self.cluster, backend = %self.ids[i], ejection = ?length, failures = n, "backend ejected");
        self.publish(&records);
    }
}
