//! Shared state across Envoy's worker threads: a key-value store with compare-and-swap (Envoy's
//! proxy-wasm shared data in the filter, an in-memory map in tests) and the bounded-retry update
//! loop every counter goes through.

use std::cell::RefCell;

use hashbrown::HashMap;

/// How many times a contended update is retried before giving up (never a trap, never a spin).
pub const MAX_CAS_RETRIES: usize = 64;

/// The value keys are created with. Not empty: the SDK reads an empty value back as absent.
/// Every reader decodes it as zero (a bucket with nothing used, no request in flight).
pub const FRESH: &[u8] = &[0];

/// A value and the version it was read at (`0` means "absent").
pub type Versioned = (Option<Vec<u8>>, u32);

/// Envoy's shared data semantics: `set` with `cas = 0` writes unconditionally, otherwise only if
/// the value is still at version `cas`. Keys are never deleted.
pub trait SharedStore {
    fn get(&self, key: &str) -> Versioned;
    /// `Err(())` on a version mismatch (someone else wrote first).
    #[allow(clippy::result_unit_err)]
    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), ()>;
    /// Told when an update or `ensure` created `key` (keys are never deleted: counted).
    fn created(&self, _key: &str) {}
}

/// Why an update did not happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpdateError<E> {
    /// The update function refused (e.g. a budget would be exceeded).
    Refused(E),
    /// Still contended after [`MAX_CAS_RETRIES`] attempts.
    Contended,
}

/// Read-modify-write of one key with compare-and-swap. `apply` sees the current bytes (or
/// `None`) and returns the new bytes and a result, or refuses. Missing keys are created with an
/// unconditional write: [`ensure`] them at configuration time so that race cannot lose updates.
pub fn update<S, T, E, F>(store: &S, key: &str, mut apply: F) -> Result<T, UpdateError<E>>
where
    S: SharedStore + ?Sized,
    F: FnMut(Option<&[u8]>) -> Result<(Vec<u8>, T), E>,
{
    for _ in 0..MAX_CAS_RETRIES {
        let (current, cas) = store.get(key);
        let (next, out) = apply(current.as_deref()).map_err(UpdateError::Refused)?;
        if store.set(key, &next, cas).is_ok() {
            if current.is_none() {
                store.created(key);
            }
            return Ok(out);
        }
    }
    Err(UpdateError::Contended)
}

/// Creates `key` with `initial` if it does not exist yet; an existing value is kept. Returns
/// whether it created the key.
pub fn ensure<S: SharedStore + ?Sized>(store: &S, key: &str, initial: &[u8]) -> bool {
    match store.get(key) {
        (Some(_), _) => false,
        (None, _) => {
            let created = store.set(key, initial, 0).is_ok();
            if created {
                store.created(key);
            }
            created
        }
    }
}

/// An in-memory store with Envoy's semantics, for tests and native tools.
#[derive(Debug, Default)]
pub struct MemStore {
    map: RefCell<HashMap<String, (Vec<u8>, u32)>>,
    next_cas: RefCell<u32>,
}

impl MemStore {
    pub fn len(&self) -> usize {
        self.map.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.borrow().is_empty()
    }
}

impl SharedStore for MemStore {
    fn get(&self, key: &str) -> Versioned {
        match self.map.borrow().get(key) {
            // Like the SDK: an empty value reads as absent (with its version).
            Some((value, cas)) if value.is_empty() => (None, *cas),
            Some((value, cas)) => (Some(value.clone()), *cas),
            None => (None, 0),
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), ()> {
        let mut map = self.map.borrow_mut();
        let mut next = self.next_cas.borrow_mut();
        *next = next.wrapping_add(1).max(1);
        match map.get_mut(key) {
            Some((_, current)) if cas != 0 && cas != *current => Err(()),
            Some(slot) => {
                *slot = (value.to_vec(), *next);
                Ok(())
            }
            None => {
                map.insert(key.to_string(), (value.to_vec(), *next));
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn update_retries_on_conflict() {
        let store = MemStore::default();
        ensure(&store, "k", b"0");
        let interfered = Cell::new(false);
        let out: Result<u32, UpdateError<()>> = update(&store, "k", |cur| {
            if !interfered.get() {
                interfered.set(true);
                // Another worker writes between our read and our write.
                store.set("k", b"5", 0).unwrap();
            }
            let n: u32 = std::str::from_utf8(cur.unwrap()).unwrap().parse().unwrap();
            Ok(((n + 1).to_string().into_bytes(), n + 1))
        });
        assert_eq!(out, Ok(6));
        assert_eq!(store.get("k").0.unwrap(), b"6");
    }

    #[test]
    fn update_gives_up_under_endless_contention() {
        let store = MemStore::default();
        ensure(&store, "k", b"x");
        let out: Result<(), UpdateError<()>> = update(&store, "k", |_| {
            store.set("k", b"y", 0).unwrap();
            Ok((b"z".to_vec(), ()))
        });
        assert_eq!(out, Err(UpdateError::Contended));
    }

    #[test]
    fn refusal_writes_nothing() {
        let store = MemStore::default();
        ensure(&store, "k", b"a");
        let out: Result<(), UpdateError<&str>> = update(&store, "k", |_| Err("no"));
        assert_eq!(out, Err(UpdateError::Refused("no")));
        assert_eq!(store.get("k").0.unwrap(), b"a");
    }

    #[test]
    fn ensure_keeps_existing_values() {
        let store = MemStore::default();
        assert!(ensure(&store, "k", b"1"));
        assert!(!ensure(&store, "k", b"2"));
        assert_eq!(store.get("k").0.unwrap(), b"1");
        assert_eq!(store.len(), 1);
    }
}
