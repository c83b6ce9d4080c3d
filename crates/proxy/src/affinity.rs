//! Client-IP affinity for TCP farms: weighted rendezvous (highest-random-weight) hashing.
//!
//! Every backend gets a score from a hash of (client address, backend id); a client's
//! connections go to its highest-scoring usable backend. The score depends only on the
//! pair, so when a backend leaves, only the clients whose first choice it was move (to
//! their second choice), and they come back when it returns; adding a backend takes
//! only the clients that now score it highest. Weights scale each backend's share
//! (`weight / -ln(u)`, the logarithmic method). The hash is fixed in this file, the
//! same on every keyway instance and across restarts, so several instances behind DNS
//! send one user's reconnects to the same PSM server.
//!
//! This module only ranks; it knows nothing of health, and performs no I/O.

use std::net::IpAddr;

/// Backends ranked for `client`, most preferred first: indices into `backends`, given
/// as `(id, weight)`.
pub fn rank<'a>(client: IpAddr, backends: impl IntoIterator<Item = (&'a str, u32)>) -> Vec<usize> {
    let key = client_key(client);
    let mut scored: Vec<(f64, usize)> = backends
        .into_iter()
        .enumerate()
        .map(|(i, (id, weight))| (score(&key, id, weight), i))
        .collect();
    // Highest score first; equal scores (practically never) by index, so the order is
    // total and the same everywhere.
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    scored.into_iter().map(|(_, i)| i).collect()
}

/// The client's address as 16 bytes: IPv4 and IPv4-mapped IPv6 hash alike, so a
/// client reaching keyway over either keeps its backend.
fn client_key(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(v6.octets(), |v4| v4.to_ipv6_mapped().octets()),
    }
}

/// `weight / -ln(u)` with `u` in (0, 1) from the pair's hash.
fn score(key: &[u8; 16], id: &str, weight: u32) -> f64 {
    let h = hash(key, id);
    // 53 bits give an exactly representable fraction; +0.5 keeps it off 0 and 1.
    let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    f64::from(weight.max(1)) / -u.ln()
}

/// FNV-1a over the pair, then the 64-bit finaliser of MurmurHash3 to spread FNV's
/// weak high bits. Stable: the same on every platform and Rust version.
fn hash(key: &[u8; 16], id: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.iter().copied().chain([0xff]).chain(id.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n))
    }

    fn first(client: IpAddr, farm: &[(&str, u32)]) -> String {
        farm[rank(client, farm.iter().copied())[0]].0.to_string()
    }

    #[test]
    fn the_same_client_ranks_the_same_way_every_time() {
        let farm = [("psm-1", 1), ("psm-2", 1), ("psm-3", 1)];
        let once = rank(ip(7), farm.iter().copied());
        for _ in 0..100 {
            assert_eq!(rank(ip(7), farm.iter().copied()), once);
        }
        assert_eq!(once.len(), 3);
    }

    #[test]
    fn the_hash_is_pinned() {
        // Another instance (or the next release) must send the client to the same
        // backend: these values may never change.
        let key = client_key(ip(1));
        assert_eq!(hash(&key, "psm-1"), hash(&client_key(ip(1)), "psm-1"));
        assert_eq!(format!("{:016x}", hash(&key, "psm-1")), PINNED);
    }
    const PINNED: &str = "d3a39babbeafba66";

    #[test]
    fn only_a_removed_backends_clients_move_and_they_come_back() {
        let all = [("psm-1", 1), ("psm-2", 1), ("psm-3", 1), ("psm-4", 1)];
        let without_2 = [("psm-1", 1), ("psm-3", 1), ("psm-4", 1)];
        let mut moved = 0;
        for n in 0..2000 {
            let before = first(ip(n), &all);
            let after = first(ip(n), &without_2);
            if before == "psm-2" {
                moved += 1;
                assert_ne!(after, "psm-2");
            } else {
                assert_eq!(before, after, "client {n} moved though its backend stayed");
            }
            // Back home once psm-2 returns.
            assert_eq!(first(ip(n), &all), before);
        }
        assert!(
            (350..650).contains(&moved),
            "about a quarter moved: {moved}"
        );
    }

    #[test]
    fn clients_spread_by_weight() {
        let farm = [("psm-1", 1), ("psm-2", 1), ("psm-3", 2)];
        let mut counts = [0usize; 3];
        for n in 0..8000 {
            counts[rank(ip(n), farm.iter().copied())[0]] += 1;
        }
        assert!((1700..2300).contains(&counts[0]), "{counts:?}");
        assert!((1700..2300).contains(&counts[1]), "{counts:?}");
        assert!((3600..4400).contains(&counts[2]), "{counts:?}");
    }

    #[test]
    fn ipv4_and_its_mapped_form_rank_alike() {
        let farm = [("psm-1", 1), ("psm-2", 1), ("psm-3", 1)];
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(
            rank(v4, farm.iter().copied()),
            rank(mapped, farm.iter().copied())
        );
    }
}
