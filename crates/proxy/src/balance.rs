//! Load-balancing algorithms: choose one backend among candidates.
//!
//! Every algorithm honours weights and skips backends the current request already
//! tried. Picking is lock-free: round-robin walks a precomputed smooth weighted schedule
//! with an atomic cursor; least-requests and p2c read the backends' in-flight counters.
//! This module only chooses; it never connects, and it never blocks.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::config::Balance;

/// What the balancer needs to know about a backend.
pub trait Candidate {
    /// Relative share of traffic (≥ 1).
    fn weight(&self) -> u32;
    /// Requests in flight right now.
    fn in_flight(&self) -> u32;
}

/// A balancer for one cluster's backends (indices into the cluster's backend list).
#[derive(Debug)]
pub struct Balancer {
    kind: Balance,
    /// Smooth weighted round-robin order over backend indices (nginx's algorithm, unrolled).
    schedule: Vec<usize>,
    cursor: AtomicUsize,
}

/// Longest schedule we unroll; larger weight sums are scaled down proportionally.
const MAX_SCHEDULE: u64 = 4096;

impl Balancer {
    /// Builds a balancer for backends with the given weights.
    pub fn new(kind: Balance, weights: &[u32]) -> Self {
        Self {
            kind,
            schedule: smooth_schedule(weights),
            cursor: AtomicUsize::new(fastrand::usize(..weights.len().max(1))),
        }
    }

    /// Picks one of `backends` that `allowed` accepts, or `None` if none is allowed.
    pub fn pick<C: Candidate>(
        &self,
        backends: &[C],
        allowed: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        match self.kind {
            Balance::RoundRobin => self.round_robin(&allowed),
            Balance::LeastRequests | Balance::LeastConnections => {
                least_requests(backends, &allowed)
            }
            Balance::P2c => p2c(backends, &allowed),
            Balance::Random => weighted_random(backends, &allowed),
        }
    }

    fn round_robin(&self, allowed: &impl Fn(usize) -> bool) -> Option<usize> {
        let n = self.schedule.len();
        if n == 0 {
            return None;
        }
        let start = self.cursor.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|k| self.schedule[(start + k) % n])
            .find(|&i| allowed(i))
    }
}

/// nginx's smooth weighted round-robin, computed once: weights 5,1,1 give a,a,b,a,c,a,a.
fn smooth_schedule(weights: &[u32]) -> Vec<usize> {
    let total: u64 = weights.iter().map(|&w| u64::from(w.max(1))).sum();
    let scale = if total > MAX_SCHEDULE {
        total as f64 / MAX_SCHEDULE as f64
    } else {
        1.0
    };
    let w: Vec<i64> = weights
        .iter()
        .map(|&x| ((f64::from(x.max(1)) / scale).round() as i64).max(1))
        .collect();
    let sum: i64 = w.iter().sum();
    let mut current = vec![0i64; w.len()];
    let mut out = Vec::with_capacity(sum as usize);
    for _ in 0..sum {
        for (c, wi) in current.iter_mut().zip(&w) {
            *c += wi;
        }
        let (best, _) = current
            .iter()
            .enumerate()
            .max_by_key(|(i, c)| (**c, std::cmp::Reverse(*i)))
            .unwrap_or((0, &0));
        current[best] -= sum;
        out.push(best);
    }
    out
}

/// `a` is less loaded than `b`, relative to weights: a.in_flight/a.weight < b.in_flight/b.weight.
fn less_loaded<C: Candidate>(a: &C, b: &C) -> bool {
    u64::from(a.in_flight()) * u64::from(b.weight())
        < u64::from(b.in_flight()) * u64::from(a.weight())
}

fn least_requests<C: Candidate>(backends: &[C], allowed: &impl Fn(usize) -> bool) -> Option<usize> {
    let n = backends.len();
    if n == 0 {
        return None;
    }
    // Start at a random offset so ties do not all land on the first backend.
    let start = fastrand::usize(..n);
    let mut best: Option<usize> = None;
    for k in 0..n {
        let i = (start + k) % n;
        if !allowed(i) {
            continue;
        }
        best = match best {
            Some(b) if !less_loaded(&backends[i], &backends[b]) => Some(b),
            _ => Some(i),
        };
    }
    best
}

fn p2c<C: Candidate>(backends: &[C], allowed: &impl Fn(usize) -> bool) -> Option<usize> {
    let first = weighted_random(backends, allowed)?;
    let second = weighted_random(backends, &|i| i != first && allowed(i));
    match second {
        Some(s) if less_loaded(&backends[s], &backends[first]) => Some(s),
        _ => Some(first),
    }
}

fn weighted_random<C: Candidate>(
    backends: &[C],
    allowed: &impl Fn(usize) -> bool,
) -> Option<usize> {
    let total: u64 = backends
        .iter()
        .enumerate()
        .filter(|(i, _)| allowed(*i))
        .map(|(_, b)| u64::from(b.weight()))
        .sum();
    if total == 0 {
        return None;
    }
    let mut r = fastrand::u64(..total);
    for (i, b) in backends.iter().enumerate() {
        if !allowed(i) {
            continue;
        }
        let w = u64::from(b.weight());
        if r < w {
            return Some(i);
        }
        r -= w;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    struct B(u32, u32);
    impl Candidate for B {
        fn weight(&self) -> u32 {
            self.0
        }
        fn in_flight(&self) -> u32 {
            self.1
        }
    }

    fn counts(bal: &Balancer, backends: &[B], n: usize) -> Vec<usize> {
        let mut c = vec![0; backends.len()];
        for _ in 0..n {
            c[bal.pick(backends, |_| true).unwrap()] += 1;
        }
        c
    }

    #[test]
    fn smooth_schedule_interleaves() {
        assert_eq!(smooth_schedule(&[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(smooth_schedule(&[1, 1]), vec![0, 1]);
    }

    #[test]
    fn round_robin_honours_weights_exactly() {
        let bs = [B(3, 0), B(1, 0)];
        let bal = Balancer::new(Balance::RoundRobin, &[3, 1]);
        assert_eq!(counts(&bal, &bs, 400), vec![300, 100]);
    }

    #[test]
    fn round_robin_skips_disallowed() {
        let bs = [B(1, 0), B(1, 0), B(1, 0)];
        let bal = Balancer::new(Balance::RoundRobin, &[1, 1, 1]);
        for _ in 0..10 {
            assert_eq!(bal.pick(&bs, |i| i == 2), Some(2));
        }
        assert_eq!(bal.pick(&bs, |_| false), None);
    }

    #[test]
    fn least_requests_prefers_idle_relative_to_weight() {
        let bs = [B(1, 5), B(1, 2), B(4, 6)];
        let bal = Balancer::new(Balance::LeastRequests, &[1, 1, 4]);
        // 6/4 = 1.5 beats 2/1 and 5/1.
        assert_eq!(bal.pick(&bs, |_| true), Some(2));
        assert_eq!(bal.pick(&bs, |i| i != 2), Some(1));
    }

    #[test]
    fn p2c_never_picks_the_most_loaded_of_two() {
        let bs = [B(1, 100), B(1, 0)];
        let bal = Balancer::new(Balance::P2c, &[1, 1]);
        for _ in 0..50 {
            assert_eq!(bal.pick(&bs, |_| true), Some(1));
        }
    }

    #[test]
    fn random_follows_weights() {
        let bs = [B(1, 0), B(9, 0)];
        let bal = Balancer::new(Balance::Random, &[1, 9]);
        let c = counts(&bal, &bs, 10_000);
        assert!(c[1] > 8_500 && c[1] < 9_500, "{c:?}");
    }
}
