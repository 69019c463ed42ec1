//! The shared-data keys of a tenant's budgets: one bucket per limit, in its owner's record (an
//! ancestor's limit in the ancestor's), a per-user limit's in the user slot's record.

use crate::admission::TenantPolicy;
use crate::budget::Limit;
use crate::record::{BucketAt, limit_id, record_key};

/// The shared-data keys of one tenant, computed once at configuration time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantKeys {
    /// The budget scope: the tenant, or an undeclared tenant's slot (`~<n>`).
    pub scope: String,
    /// One per limit, same order as `TenantPolicy::limits`.
    pub buckets: Vec<BucketAt>,
    /// The scope's own record: its concurrency slots and the buckets of the limits it owns.
    pub concurrency: String,
    /// The end user's slot, when its per-user limits' buckets are the slot's ([`for_user`]).
    ///
    /// [`for_user`]: TenantKeys::for_user
    pub user_slot: Option<u64>,
}

impl TenantKeys {
    /// `scope` is the tenant name, or a slot name for undeclared tenants; an ancestor's limit
    /// is in the ancestor's record (its `owner`).
    pub fn new(scope: &str, policy: &TenantPolicy) -> TenantKeys {
        TenantKeys {
            scope: scope.to_string(),
            buckets: policy
                .limits
                .iter()
                .map(|l| bucket_key(scope, l, 0))
                .collect(),
            concurrency: record_key(scope),
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

    /// Every record, for creation at configuration time (a record may repeat).
    pub fn all(&self) -> impl Iterator<Item = &str> {
        self.buckets
            .iter()
            .map(|at| at.record.as_str())
            .chain(std::iter::once(self.concurrency.as_str()))
    }
}

/// What one record holds, and where builds before the records kept its buckets (one key per
/// bucket, `tg:b2:`): a record created where they exist starts from them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordPlan {
    /// The limits the record holds (a bucket of any other is dropped at configuration time).
    pub ids: Vec<u64>,
    /// The earlier key of each limit's bucket.
    pub legacy: Vec<(u64, String)>,
}

impl TenantKeys {
    /// Adds this tenant's records to `plans`.
    pub fn plan_records(
        &self,
        policy: &TenantPolicy,
        plans: &mut std::collections::BTreeMap<String, RecordPlan>,
    ) {
        for (limit, at) in policy.limits.iter().zip(&self.buckets) {
            let plan = plans.entry(at.record.clone()).or_default();
            if !plan.ids.contains(&at.id) {
                plan.ids.push(at.id);
                let owner = limit.owner.as_deref().unwrap_or(&self.scope);
                let legacy = match (limit.per_user, self.user_slot) {
                    (true, Some(slot)) => format!("tg:b2:{owner}:u{slot}:{}", limit.name),
                    _ => format!("tg:b2:{owner}:{}", limit.name),
                };
                plan.legacy.push((at.id, legacy));
            }
        }
        plans.entry(self.concurrency.clone()).or_default();
    }
}

/// The bucket of `limit` for a tenant scope: in the owner's record (an ancestor's limit), and
/// for a per-user limit in the user slot's.
fn bucket_key(scope: &str, limit: &Limit, user_slot: u64) -> BucketAt {
    let owner = limit.owner.as_deref().unwrap_or(scope);
    let record = if limit.per_user {
        record_key(&format!("{owner}:u{user_slot}"))
    } else {
        record_key(owner)
    };
    BucketAt {
        record,
        id: limit_id(&limit.name),
    }
}
