//! The in-flight byte budget (SPEC §8): requests hold permits for their bytes from the first body
//! frame on (wire bytes while they are read, plus their decoded size while they are processed);
//! when the budget is spent, requests get a retryable overload error instead of queueing, so
//! memory stays bounded whatever the load.

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

/// A held part of the budget, returned on drop. It grows while a request is read (each body
/// frame as it arrives), so a request is charged before it is buffered, not after.
#[derive(Debug)]
pub struct BudgetPermit {
    budget: Budget,
    permit: Option<OwnedSemaphorePermit>,
    bytes: u32,
}

impl Drop for BudgetPermit {
    fn drop(&mut self) {
        metrics::gauge!(m::INFLIGHT_BYTES).decrement(self.bytes as f64);
    }
}

impl BudgetPermit {
    /// Takes `bytes` more of the budget, or fails at once with a retryable overload error (what
    /// is held stays held until the permit is dropped). A request larger than the whole budget
    /// takes all of it rather than never fitting.
    pub fn grow(&mut self, bytes: usize) -> Result<(), Error> {
        let more = bytes.min((self.budget.capacity - self.bytes) as usize) as u32;
        if more == 0 {
            return Ok(());
        }
        match Arc::clone(&self.budget.semaphore).try_acquire_many_owned(more) {
            Ok(permit) => {
                match &mut self.permit {
                    Some(held) => held.merge(permit),
                    None => self.permit = Some(permit),
                }
                self.bytes += more;
                metrics::gauge!(m::INFLIGHT_BYTES).increment(more as f64);
                Ok(())
            }
            Err(_) => {
                metrics::counter!(m::OVERLOAD, "what" => "inflight_bytes").increment(1);
                Err(Error::overloaded(format!(
                    "in-flight request bytes would exceed limits.max_inflight_bytes ({}); retry later",
                    self.budget.capacity
                )))
            }
        }
    }

    /// Gives back up to `bytes` of what is held (a buffer the request no longer needs).
    pub fn release(&mut self, bytes: usize) {
        let less = bytes.min(self.bytes as usize) as u32;
        if less == 0 {
            return;
        }
        if let Some(held) = &mut self.permit {
            drop(held.split(less as usize));
        }
        self.bytes -= less;
        metrics::gauge!(m::INFLIGHT_BYTES).decrement(less as f64);
    }

    /// Bytes held.
    pub fn held(&self) -> usize {
        self.bytes as usize
    }
}

impl Budget {
    /// A budget of `bytes` (at most 4 GiB).
    pub fn new(bytes: usize) -> Budget {
        let capacity = bytes.clamp(1, u32::MAX as usize) as u32;
        Budget { semaphore: Arc::new(Semaphore::new(capacity as usize)), capacity }
    }

    /// A permit holding nothing yet, to [`grow`](BudgetPermit::grow) as a request is read.
    pub fn empty(&self) -> BudgetPermit {
        BudgetPermit { budget: self.clone(), permit: None, bytes: 0 }
    }

    /// Takes `bytes` of the budget (at least 1), or fails at once with a retryable overload error.
    pub fn try_acquire(&self, bytes: usize) -> Result<BudgetPermit, Error> {
        let mut permit = self.empty();
        permit.grow(bytes.max(1))?;
        Ok(permit)
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
        let mut released = budget.try_acquire(70).unwrap();
        released.release(50);
        assert_eq!((released.held(), budget.available()), (20, 80));
        released.release(1000);
        assert_eq!((released.held(), budget.available()), (0, 100));
        drop(released);
        assert_eq!(budget.available(), 100);
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

    #[test]
    fn test_budget_permit_grows_frame_by_frame_and_returns_everything_on_drop() {
        let budget = Budget::new(100);
        let mut reading = budget.empty();
        reading.grow(30).unwrap();
        reading.grow(30).unwrap();
        assert_eq!((reading.held(), budget.available()), (60, 40));
        let other = budget.try_acquire(30).unwrap();
        // Growing past what is left fails and keeps what was held.
        assert!(matches!(reading.grow(30), Err(Error::Overloaded { .. })));
        assert_eq!((reading.held(), budget.available()), (60, 10));
        drop(other);
        // Past the whole budget: takes the rest, no more.
        reading.grow(1000).unwrap();
        assert_eq!((reading.held(), budget.available()), (100, 0));
        reading.grow(1).unwrap();
        drop(reading);
        assert_eq!(budget.available(), 100);
    }
}
