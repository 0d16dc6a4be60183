//! A value kept for each device node ([`super::DeviceEntry::node`]): a partition that a
//! rescan leaves unchanged keeps it, and a new or changed partition starts afresh.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

/// A value for each device node: `initial` until the node's value is changed.
pub struct PerFile<T: Copy> {
    initial: T,
    changed: Mutex<HashMap<u64, T>>,
}

impl<T: Copy> PerFile<T> {
    pub fn new(initial: T) -> Self {
        Self {
            initial,
            changed: Mutex::new(HashMap::new()),
        }
    }

    /// Returns the value of the device node `node`.
    pub fn of(&self, node: u64) -> T {
        self.lock().get(&node).copied().unwrap_or(self.initial)
    }

    /// Changes the value of the device node `node` with `change`.
    pub fn update(&self, node: u64, change: impl FnOnce(&mut T)) {
        let mut changed = self.lock();
        change(changed.entry(node).or_insert(self.initial));
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, T>> {
        self.changed
            .lock()
            .unwrap_or_else(|error| error.into_inner())
    }
}
