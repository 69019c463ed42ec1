//! End users inside a tenant (`identity.user`): where their id comes from, the budget slot it
//! hashes to (`identity.user_slots`), and how the ledger names it.
//!
//! A tenant's `user_limits` apply to each user apart, in the user's slot: a bounded key space
//! however many ids clients send. Two users whose ids hash to one slot share its budgets, which
//! is stricter for both, never looser; `tollgate_user_slot_collisions` counts requests whose
//! slot was last used by another user.

use sha2::{Digest, Sha256};

/// Where a request's end user comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserSource {
    /// A header set by something trusted in front of Envoy (lower-cased name).
    Header(String),
    /// An Envoy property: a JWT claim `jwt_authn` wrote to metadata, the mTLS peer, …
    Metadata(Vec<String>),
    /// The request body's own field: OpenAI's `user`, Anthropic's `metadata.user_id`. The client
    /// chooses it: per-user limits then hold only for clients that name their users honestly.
    Body,
}

/// How the ledger names a user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserInLedger {
    /// A pseudonym: 16 hex digits of the id's SHA-256. Lines of one user join; the id (often an
    /// e-mail) is not in the export. Whoever knows an id can hash it to find its lines.
    Hash,
    /// The id itself (at most [`MAX_LEDGER_ID_BYTES`] bytes of it).
    Raw,
}

/// The `identity.user` section, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Users {
    pub source: UserSource,
    /// Budget slots per tenant scope (`identity.user_slots`).
    pub slots: u64,
    pub ledger: UserInLedger,
}

/// The longest id the ledger prints raw.
pub const MAX_LEDGER_ID_BYTES: usize = 256;

/// One request's end user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// The budget slot of its per-user limits.
    pub slot: u64,
    /// Tells users in one slot apart (the collision count).
    pub fingerprint: u64,
    /// How the ledger names it.
    pub ledger: String,
}

impl Users {
    /// The user of `id` (any bytes; an absent id is the empty one, one slot like any other).
    pub fn user(&self, id: &[u8]) -> User {
        let digest: [u8; 32] = Sha256::digest(id).into();
        let [a, b, c, d, e, f, g, h, i, j, k, l, m, n, o, p, ..] = digest;
        let slot = u64::from_le_bytes([a, b, c, d, e, f, g, h]) % self.slots.max(1);
        let fingerprint = u64::from_le_bytes([i, j, k, l, m, n, o, p]);
        let ledger = match self.ledger {
            UserInLedger::Hash => [a, b, c, d, e, f, g, h]
                .iter()
                .map(|byte| format!("{byte:02x}"))
                .collect(),
            UserInLedger::Raw => {
                let mut end = id.len().min(MAX_LEDGER_ID_BYTES);
                while end > 0 && std::str::from_utf8(id.get(..end).unwrap_or_default()).is_err() {
                    end -= 1;
                }
                String::from_utf8_lossy(id.get(..end).unwrap_or_default()).into_owned()
            }
        };
        User {
            slot,
            fingerprint,
            ledger,
        }
    }
}

/// The shared-data key remembering which user last used `slot` of a tenant scope.
pub fn slot_owner_key(scope: &str, slot: u64) -> String {
    format!("tg:us2:{scope}:{slot}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users(slots: u64, ledger: UserInLedger) -> Users {
        Users {
            source: UserSource::Body,
            slots,
            ledger,
        }
    }

    #[test]
    fn ids_hash_to_bounded_slots_and_stable_pseudonyms() {
        let u = users(8, UserInLedger::Hash);
        let alice = u.user(b"alice@example.com");
        assert_eq!(alice, u.user(b"alice@example.com"));
        assert!(alice.slot < 8);
        assert_eq!(alice.ledger.len(), 16);
        assert!(!alice.ledger.contains("alice"));
        assert_ne!(alice.fingerprint, u.user(b"bob").fingerprint);
        // 100,000 distinct ids stay in their 8 slots.
        let mut seen = [0u32; 8];
        for n in 0..100_000u32 {
            let slot = u.user(n.to_string().as_bytes()).slot;
            seen[usize::try_from(slot).unwrap()] += 1;
        }
        assert!(seen.iter().all(|&c| c > 10_000), "{seen:?}");
    }

    #[test]
    fn raw_ids_are_printed_bounded_and_whole_characters() {
        let u = users(4, UserInLedger::Raw);
        assert_eq!(u.user(b"alice").ledger, "alice");
        let long = "é".repeat(200);
        let printed = u.user(long.as_bytes()).ledger;
        assert!(printed.len() <= MAX_LEDGER_ID_BYTES && printed.chars().all(|c| c == 'é'));
        assert_eq!(u.user(b"\xff\xfe").ledger, "");
    }
}
