//! Budget alerts: a limit's `alert_at` thresholds (fractions of its amount). When a request's
//! reservation takes `used + reserved` to a threshold, the crossing is recorded once per window
//! in shared data (one key per limit and budget scope), so it is counted once per Envoy across
//! all its workers: `tollgate_budget_alerts{tenant,limit,threshold}`.

use crate::store::{SharedStore, UpdateError, update};

/// At most this many thresholds per limit.
pub const MAX_THRESHOLDS: usize = 8;

/// The shared-data key of a limit's alert state, in the budget scope that owns the limit.
pub fn key(scope: &str, limit: &str) -> String {
    format!("tg:al2:{scope}:{limit}")
}

/// The thresholds (bit `i`: `alert_at[i]`, in thousandths) that `taken` reaches of `amount`.
pub fn reached(alert_at: &[u16], taken: u64, amount: u64) -> u64 {
    let taken = u128::from(taken) * 1000;
    alert_at
        .iter()
        .take(MAX_THRESHOLDS)
        .enumerate()
        .filter(|(_, permille)| taken >= u128::from(amount) * u128::from(**permille))
        .fold(0, |mask, (i, _)| mask | (1 << i))
}

/// Records that the window starting at `window_start` reached `reached`; returns the thresholds
/// no request of this Envoy had reached before in that window (0 under endless contention).
pub fn cross<S: SharedStore + ?Sized>(
    store: &S,
    key: &str,
    window_start: u64,
    reached: u64,
) -> u64 {
    let result: Result<u64, UpdateError<()>> = update(store, key, |bytes| {
        let (window, mask) = decode(bytes);
        let known = if window == window_start { mask } else { 0 };
        let new = reached & !known;
        if new == 0 {
            return Err(());
        }
        let mut out = Vec::with_capacity(16);
        out.extend_from_slice(&window_start.to_le_bytes());
        out.extend_from_slice(&(known | reached).to_le_bytes());
        Ok((out, new))
    });
    result.unwrap_or(0)
}

fn decode(bytes: Option<&[u8]>) -> (u64, u64) {
    let word = |range: std::ops::Range<usize>| {
        bytes
            .and_then(|b| b.get(range))
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map_or(0, u64::from_le_bytes)
    };
    (word(0..8), word(8..16))
}

/// A threshold as a metric label: its percentage (`80`, `87_5`).
pub fn label(permille: u16) -> String {
    match permille % 10 {
        0 => (permille / 10).to_string(),
        tenth => format!("{}_{tenth}", permille / 10),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemStore;

    #[test]
    fn each_threshold_is_crossed_once_per_window() {
        let at = [500, 800, 1000];
        assert_eq!(reached(&at, 499, 1000), 0);
        assert_eq!(reached(&at, 500, 1000), 0b001);
        assert_eq!(reached(&at, 950, 1000), 0b011);
        assert_eq!(reached(&at, 5000, 1000), 0b111);
        let store = MemStore::default();
        assert_eq!(cross(&store, "k", 60, 0b001), 0b001);
        assert_eq!(cross(&store, "k", 60, 0b001), 0);
        assert_eq!(cross(&store, "k", 60, 0b011), 0b010);
        // A new window: crossed anew.
        assert_eq!(cross(&store, "k", 120, 0b001), 0b001);
        assert_eq!(label(800), "80");
        assert_eq!(label(875), "87_5");
        assert_eq!(label(1000), "100");
    }
}
