//! The in-flight byte budget (SPEC §8): requests being processed hold permits for their size;
//! when the budget is spent, new requests get a retryable overload error instead of queueing,
//! so memory stays bounded whatever the load.

use crate::error::Error;
use crate::metrics as m;
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bytes of requests in flight, bounded.
#[derive(Clone, Debug)]
pub struct Budget {
    semaphore: Arc<Semaphore>,
    capacity: u32,
}

/// A held part of the budget, returned on drop.
#[derive(Debug)]
pub struct BudgetPermit {
    _permit: OwnedSemaphorePermit,
    bytes: u32,
}

impl Drop for BudgetPermit {
    fn drop(&mut self) {
        metrics::gauge!(m::INFLIGHT_BYTES).decrement(self.bytes as f64);
    }
}

impl Budget {
    /// A budget of `bytes` (at most 4 GiB).
    pub fn new(bytes: usize) -> Budget {
        let capacity = bytes.min(u32::MAX as usize) as u32;
        Budget { semaphore: Arc::new(Semaphore::new(capacity as usize)), capacity }
    }

    /// Takes `bytes` of the budget, or fails at once with a retryable overload error.
    pub fn try_acquire(&self, bytes: usize) -> Result<BudgetPermit, Error> {
        let bytes = bytes.clamp(1, self.capacity as usize) as u32;
        match Arc::clone(&self.semaphore).try_acquire_many_owned(bytes) {
            Ok(permit) => {
                metrics::gauge!(m::INFLIGHT_BYTES).increment(bytes as f64);
                Ok(BudgetPermit { _permit: permit, bytes })
            }
            Err(_) => {
                metrics::counter!(m::OVERLOAD, "what" => "inflight_bytes").increment(1);
                Err(Error::overloaded(format!(
                    "in-flight request bytes would exceed limits.max_inflight_bytes ({}); retry later",
                    self.capacity
                )))
            }
        }
    }

    /// Bytes currently available.
    pub fn available(&self) -> usize {
        self.semaphore.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_budget_refuses_beyond_capacity_and_recovers() {
        let budget = Budget::new(100);
        let a = budget.try_acquire(60).unwrap();
        assert!(matches!(budget.try_acquire(60), Err(Error::Overloaded { .. })));
        let b = budget.try_acquire(40).unwrap();
        drop(a);
        assert_eq!(budget.available(), 60);
        drop(b);
        assert_eq!(budget.available(), 100);
        // A request larger than the whole budget takes all of it rather than never fitting.
        let all = budget.try_acquire(1000).unwrap();
        assert_eq!(budget.available(), 0);
        drop(all);
    }
}
