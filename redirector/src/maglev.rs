//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): builds a service's lookup table
//! so that removing one of N backends moves only about 1/N of the slots.
#[cfg(test)]
use redirector_common::{MAGLEV_M, MAGLEV_M_SMALL};

/// FNV-1a 64: stable across runs and versions (tables must not change on an agent restart).
fn fnv1a(seed: u64, data: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in data {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // Final avalanche so that similar names spread.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h
}

/// Builds the table of `m` slots (a prime) for backends named by `names` (any stable
/// identity, e.g. "ip:port"). Each slot holds an index into `names`. Empty input gives
/// `None`.
pub fn build_table(names: &[String], m: usize) -> Option<Vec<u32>> {
    let n = names.len();
    if n == 0 || m < 2 {
        return None;
    }
    let slots = m;
    let m = m as u64;
    let perm: Vec<(u64, u64)> = names
        .iter()
        .map(|name| {
            let offset = fnv1a(0, name.as_bytes()) % m;
            let skip = fnv1a(0x5bd1_e995, name.as_bytes()) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; n];
    let mut table = vec![u32::MAX; slots];
    let mut filled = 0;
    'outer: loop {
        for i in 0..n {
            let (offset, skip) = perm[i];
            let mut c = (offset + next[i] * skip) % m;
            while table[c as usize] != u32::MAX {
                next[i] += 1;
                c = (offset + next[i] * skip) % m;
            }
            table[c as usize] = i as u32;
            next[i] += 1;
            filled += 1;
            if filled == slots {
                break 'outer;
            }
        }
    }
    Some(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("10.1.{}.{}:8080", i / 250, i % 250 + 1))
            .collect()
    }

    #[test]
    fn balanced() {
        for (m, n, tolerance) in [
            (MAGLEV_M, 1, 0.2),
            (MAGLEV_M, 3, 0.2),
            (MAGLEV_M, 10, 0.2),
            (MAGLEV_M, 50, 0.2),
            // The small table: every backend within one slot of even.
            (MAGLEV_M_SMALL, 2, 0.01),
            (MAGLEV_M_SMALL, 5, 0.05),
            (MAGLEV_M_SMALL, 8, 0.04),
        ] {
            let t = build_table(&names(n), m).unwrap();
            assert_eq!(t.len(), m);
            let mut counts = vec![0usize; n];
            for s in &t {
                counts[*s as usize] += 1;
            }
            let ideal = m as f64 / n as f64;
            for c in counts {
                assert!(
                    (c as f64) >= ideal * (1.0 - tolerance)
                        && (c as f64) <= ideal * (1.0 + tolerance),
                    "m={m} n={n} c={c} ideal={ideal:.1}"
                );
            }
        }
    }

    /// Removing one of N backends moves ~1/N of the slots (the ones it owned), and only a
    /// small extra fraction of the others. Maglev's extra disruption grows as M/N shrinks
    /// (M = 997 slots): at N = 10 it stays within 1.5/N, at N = 20 within 1.8/N; at N = 40
    /// it reaches ~3/N, which is why services with many backends want a larger M.
    #[test]
    fn removal_moves_about_one_nth() {
        for (n, bound) in [(5usize, 1.5), (10, 1.5), (20, 1.8)] {
            let all = names(n);
            let before = build_table(&all, MAGLEV_M).unwrap();
            let removed = 3;
            let rest: Vec<String> = all
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != removed)
                .map(|(_, s)| s.clone())
                .collect();
            let after = build_table(&rest, MAGLEV_M).unwrap();
            let mut moved = 0;
            for (b, a) in before.iter().zip(&after) {
                if all[*b as usize] != rest[*a as usize] {
                    moved += 1;
                }
            }
            let frac = moved as f64 / MAGLEV_M as f64;
            let ideal = 1.0 / n as f64;
            println!("n={n}: moved {frac:.4} of slots, ideal {ideal:.4}");
            assert!(
                frac >= ideal * 0.8 && frac <= ideal * bound,
                "n={n}: moved {frac:.3}, ideal {ideal:.3}"
            );
        }
    }

    #[test]
    fn stable() {
        assert_eq!(
            build_table(&names(7), MAGLEV_M),
            build_table(&names(7), MAGLEV_M)
        );
    }
}
