//! A value kept for each device node ([`super::DeviceEntry::node`]). A partition that a
//! rescan leaves unchanged keeps it, and a new or changed partition starts afresh.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

/// A value for each device node whose value was changed.
pub struct PerNode<T: Copy> {
    changed: Mutex<HashMap<u64, T>>,
}

impl<T: Copy> PerNode<T> {
    pub fn new() -> Self {
        Self {
            changed: Mutex::new(HashMap::new()),
        }
    }

    /// Returns the value of the device node `node`, if it was changed.
    pub fn get(&self, node: u64) -> Option<T> {
        self.lock().get(&node).copied()
    }

    /// Changes the value of the device node `node`, `initial` until now, with `change`.
    pub fn update(&self, node: u64, initial: T, change: impl FnOnce(&mut T)) {
        let mut changed = self.lock();
        change(changed.entry(node).or_insert(initial));
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, T>> {
        self.changed
            .lock()
            .unwrap_or_else(|error| error.into_inner())
    }
}
