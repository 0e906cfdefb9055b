//! A registry of QOM objects of one type by id (`--object`, object-add), shared with the
//! I/O threads that look them up when they open a node or accept a connection.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// Objects of one type by id. An object taken out with [`Objects::get`] stays alive while
/// its user holds it, also after object-del (as QEMU's reference counts keep it).
pub struct Objects<T> {
    map: Mutex<HashMap<String, Arc<T>>>,
}

impl<T> Default for Objects<T> {
    fn default() -> Self {
        Objects {
            map: Mutex::new(HashMap::new()),
        }
    }
}

impl<T> Objects<T> {
    fn map(&self) -> MutexGuard<'_, HashMap<String, Arc<T>>> {
        // Every critical section is one map operation: a panic cannot leave it half done.
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds `object` as `id`; false (and nothing added) if the id is taken.
    pub fn insert(&self, id: &str, object: T) -> bool {
        let mut map = self.map();
        if map.contains_key(id) {
            return false;
        }
        map.insert(id.to_string(), Arc::new(object));
        true
    }

    /// The object `id`, if there is one.
    pub fn get(&self, id: &str) -> Option<Arc<T>> {
        self.map().get(id).cloned()
    }

    /// Takes `id` out of the registry; false if there was none.
    pub fn remove(&self, id: &str) -> bool {
        self.map().remove(id).is_some()
    }

    /// The ids, sorted.
    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.map().keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Whether `id` is taken.
    pub fn contains(&self, id: &str) -> bool {
        self.map().contains_key(id)
    }
}
