//! A value kept for each device file, by name, so that it outlives a partition rescan.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

/// A value for each device file: `initial` until the file's value is changed.
pub struct PerFile<T: Copy> {
    initial: T,
    changed: Mutex<HashMap<String, T>>,
}

impl<T: Copy> PerFile<T> {
    pub fn new(initial: T) -> Self {
        Self {
            initial,
            changed: Mutex::new(HashMap::new()),
        }
    }

    /// Returns the value of the device file `name`.
    pub fn of(&self, name: &str) -> T {
        self.lock().get(name).copied().unwrap_or(self.initial)
    }

    /// Changes the value of the device file `name` with `change`.
    pub fn update(&self, name: &str, change: impl FnOnce(&mut T)) {
        let mut changed = self.lock();
        change(changed.entry(name.to_string()).or_insert(self.initial));
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, T>> {
        self.changed
            .lock()
            .unwrap_or_else(|error| error.into_inner())
    }
}
