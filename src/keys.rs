//! The shared-data keys of a tenant's budgets: one bucket per limit, in its owner's scope (an
//! ancestor's limit in the ancestor's), a per-user limit's in the user's slot.

use crate::admission::TenantPolicy;
use crate::budget::Limit;

/// The shared-data keys of one tenant, computed once at configuration time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantKeys {
    /// The budget scope: the tenant, or an undeclared tenant's slot (`~<n>`).
    pub scope: String,
    /// One per limit, same order as `TenantPolicy::limits`.
    pub buckets: Vec<String>,
    pub concurrency: String,
    /// The end user's slot, when its per-user limits' buckets are the slot's ([`for_user`]).
    ///
    /// [`for_user`]: TenantKeys::for_user
    pub user_slot: Option<u64>,
}

impl TenantKeys {
    /// `scope` is the tenant name, or a slot name for undeclared tenants; an ancestor's limit
    /// is in the ancestor's bucket (its `owner`). The `2` is the value format (buckets and
    /// slots hold epoch rings since 0.2): a code update that keeps the `vm_id` must not read
    /// the old format's keys.
    pub fn new(scope: &str, policy: &TenantPolicy) -> TenantKeys {
        TenantKeys {
            scope: scope.to_string(),
            buckets: policy
                .limits
                .iter()
                .map(|l| bucket_key(scope, l, 0))
                .collect(),
            concurrency: format!("tg:c2:{scope}"),
            user_slot: None,
        }
    }

    /// The keys of the end user in `slot`: its per-user limits' buckets are the slot's.
    /// `None` when the policy has no per-user limit (the keys are the tenant's as they are).
    pub fn for_user(&self, policy: &TenantPolicy, slot: u64) -> Option<TenantKeys> {
        if !policy.limits.iter().any(|l| l.per_user) {
            return None;
        }
        let mut keys = self.clone();
        keys.user_slot = Some(slot);
        for (limit, key) in policy.limits.iter().zip(keys.buckets.iter_mut()) {
            if limit.per_user {
                *key = bucket_key(&self.scope, limit, slot);
            }
        }
        Some(keys)
    }

    /// Every key, for creation at configuration time.
    pub fn all(&self) -> impl Iterator<Item = &str> {
        self.buckets
            .iter()
            .map(String::as_str)
            .chain(std::iter::once(self.concurrency.as_str()))
    }
}

/// The bucket of `limit` for a tenant scope: the owner's (an ancestor's limit), and for a
/// per-user limit the user slot's.
fn bucket_key(scope: &str, limit: &Limit, user_slot: u64) -> String {
    let owner = limit.owner.as_deref().unwrap_or(scope);
    if limit.per_user {
        format!("tg:b2:{owner}:u{user_slot}:{}", limit.name)
    } else {
        format!("tg:b2:{owner}:{}", limit.name)
    }
}
