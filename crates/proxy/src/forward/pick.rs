//! Choosing a backend among the eligible ones and getting a slot and a connection:
//! the pinned backend, the balancer, or the ordered staggered race.
//! It never widens the eligible set, and gives a drained backend only a pinned request.

use super::*;

/// Chooses a backend and gets one of its slots and a connection to it. Failed (and
/// full) backends are added to `tried`.
pub(super) async fn pick_and_connect(
    cluster: &Cluster,
    pinned: Option<usize>,
    tried: &mut Vec<usize>,
    purpose: Purpose,
    eligible: &Eligible,
) -> Result<(usize, Sender, Slot), ProxyError> {
    let cfg = &cluster.cfg;
    let (connect, queue) = (cfg.connect_timeout, cfg.queue_timeout);
    if let Some(p) = pinned.filter(|p| !tried.contains(p)) {
        match upstream::checkout_with_slot(&cluster.backends[p], purpose, connect, queue).await {
            Ok((s, slot)) => return Ok((p, s, slot)),
            // The pinned backend is down or full: fall through to normal selection; the response
            // will re-pin the client. This costs no retry: the pin was a preference.
            Err(_) => tried.push(p),
        }
    }
    match cfg.strategy {
        Strategy::Balanced | Strategy::PrimaryReplica => {
            let eligible_now = |i: usize| !tried.contains(&i) && eligible.fresh(i);
            // Degraded backends are standbys: only when no healthy one is allowed.
            let healthy_left = healthy_left(cluster, &eligible.view, &eligible_now);
            let allowed = |i: usize| eligible_now(i) && !(healthy_left && eligible.view.standby(i));
            // A backend with a free slot first: queue only when every candidate is full.
            let free = |i: usize| allowed(i) && cluster.backends[i].has_free_slot();
            let picked = cluster
                .balancer
                .pick(&cluster.backends, free)
                .or_else(|| cluster.balancer.pick(&cluster.backends, allowed));
            let Some(i) = picked else {
                return Err(all_failed(cluster));
            };
            match upstream::checkout_with_slot(&cluster.backends[i], purpose, connect, queue).await
            {
                Ok((s, slot)) => Ok((i, s, slot)),
                Err(e) => {
                    tried.push(i);
                    Err(e)
                }
            }
        }
        Strategy::Ordered => {
            let allowed = |i: usize| !tried.contains(&i) && eligible.fresh(i);
            // Degraded backends are standbys: only when no healthy one is allowed.
            let healthy_left = healthy_left(cluster, &eligible.view, &allowed);
            let mut order: Vec<usize> = cluster
                .by_priority
                .iter()
                .copied()
                .filter(|&i| allowed(i) && !(healthy_left && eligible.view.standby(i)))
                .collect();
            if cfg.balance == Balance::Random {
                cluster.shuffle_within_priority(&mut order);
            }
            if order.is_empty() {
                return Err(all_failed(cluster));
            }
            match upstream::staggered_connect(
                &cluster.backends,
                &order,
                cfg.connect_stagger,
                connect,
                queue,
                purpose,
            )
            .await
            {
                Ok((i, sender, slot, _failed)) => Ok((i, sender, slot)),
                Err(mut failures) => {
                    tried.extend(order);
                    if failures.iter().all(|e| e.kind == ErrorKind::BackendBusy) {
                        if let Some(busy) = failures.pop() {
                            return Err(busy);
                        }
                    }
                    let last = failures
                        .into_iter()
                        .last()
                        .map(|e| e.detail)
                        .unwrap_or_default();
                    Err(ProxyError::new(
                        ErrorKind::NoBackendAvailable,
                        Side::Upstream,
                        false,
                        format!(
                            "no backend of cluster `{}` answered (last error: {last})",
                            cfg.name
                        ),
                    ))
                }
            }
        }
    }
}

/// No backend is left for this request: each one it may use failed or was full.
fn all_failed(cluster: &Cluster) -> ProxyError {
    ProxyError::new(
        ErrorKind::NoBackendAvailable,
        Side::Internal,
        false,
        format!(
            "every backend of cluster `{}` failed for this request",
            cluster.cfg.name
        ),
    )
}

/// No backend is left after the retries: the last error when the backends were only
/// full, else that none could be reached.
pub(super) fn no_backend_left(cluster: &Cluster, last: ProxyError) -> ProxyError {
    if last.kind == ErrorKind::BackendBusy {
        // Say so: the backends are up, just full.
        return last;
    }
    ProxyError::new(
        ErrorKind::NoBackendAvailable,
        Side::Upstream,
        false,
        format!(
            "no backend of cluster `{}` could be reached (last error: {})",
            cluster.cfg.name, last.detail
        ),
    )
}
