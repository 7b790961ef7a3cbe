//! [`SeriesMap`]: per-series state keyed by the series name, for the hot path.
//!
//! The processor looks a series up several times per event (its summary windows, then the
//! state of every rule that matches it). In a `BTreeMap<String, _>` each lookup walks the tree
//! comparing whole keys, and series keys of one gateway share long prefixes
//! (`pump-017/temperature`): at 1,000 series those `memcmp` calls were 30 % of the processing
//! core's time (perf, session 11). A hash map with a fast, fixed-seed hash (`rustc-hash`'s
//! FxHasher) makes a lookup one hash of the key and, almost always, one comparison.
//!
//! What the B-tree gave for free and this type keeps:
//!
//! - **Deterministic encoding**: snapshots serialize the entries sorted by key, exactly as a
//!   `BTreeMap` did (postcard: a length, then the pairs), so old snapshots decode, and equal
//!   states encode to equal bytes whatever their insertion history.
//! - **Deterministic order where it reaches the output**: iteration order of a hash map
//!   depends on its history (a map restored from a snapshot and the live one differ), so the
//!   callers that emit records while iterating use [`SeriesMap::sorted_keys`]: replay after a
//!   crash must give records the same sequence numbers as the live run.
//!
//! Hash flooding: the keys come from MQTT topics or serial frames on the gateway's own network;
//! a publisher able to choose topics can at worst slow lookups for its own crafted series, and
//! the number of series per rule and of windows is bounded anyway.

use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasherDefault;

use rustc_hash::FxHasher;
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

type Inner<V> = HashMap<String, V, BuildHasherDefault<FxHasher>>;

/// A map from series name to `V`; see the module docs.
#[derive(Clone, PartialEq)]
pub struct SeriesMap<V>(Inner<V>);

impl<V> Default for SeriesMap<V> {
    fn default() -> Self {
        Self(Inner::default())
    }
}

impl<V: fmt::Debug> fmt::Debug for SeriesMap<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.sorted()).finish()
    }
}

impl<V> SeriesMap<V> {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn contains_key(&self, series: &str) -> bool {
        self.0.contains_key(series)
    }

    pub fn get(&self, series: &str) -> Option<&V> {
        self.0.get(series)
    }

    pub fn get_mut(&mut self, series: &str) -> Option<&mut V> {
        self.0.get_mut(series)
    }

    pub fn insert(&mut self, series: String, value: V) -> Option<V> {
        self.0.insert(series, value)
    }

    pub fn remove(&mut self, series: &str) -> Option<V> {
        self.0.remove(series)
    }

    /// Keeps the entries for which `keep` returns true, in no particular order: `keep` must
    /// not emit anything (see [`SeriesMap::sorted_keys`]).
    pub fn retain_unordered(&mut self, keep: impl FnMut(&String, &mut V) -> bool) {
        self.0.retain(keep);
    }

    /// The values, in no particular order (for sums and minimums).
    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.0.values()
    }

    /// The entries, in no particular order (for merging into another map).
    pub fn iter(&self) -> impl Iterator<Item = (&String, &V)> {
        self.0.iter()
    }

    /// The keys, in no particular order (for counts and sets).
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.0.keys()
    }

    /// The entries sorted by key: the order of a `BTreeMap`.
    pub fn sorted(&self) -> Vec<(&String, &V)> {
        let mut entries: Vec<_> = self.0.iter().collect();
        entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
        entries
    }

    /// The keys for which `pick` holds, sorted: for callers that emit records per entry.
    pub fn sorted_keys(&self, mut pick: impl FnMut(&V) -> bool) -> Vec<String> {
        let mut keys: Vec<String> =
            self.0.iter().filter(|(_, v)| pick(v)).map(|(k, _)| k.clone()).collect();
        keys.sort_unstable();
        keys
    }
}

impl<V> Extend<(String, V)> for SeriesMap<V> {
    fn extend<I: IntoIterator<Item = (String, V)>>(&mut self, iter: I) {
        self.0.extend(iter);
    }
}

impl<V> IntoIterator for SeriesMap<V> {
    type Item = (String, V);
    type IntoIter = std::collections::hash_map::IntoIter<String, V>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<V: Serialize> Serialize for SeriesMap<V> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let sorted = self.sorted();
        let mut map = serializer.serialize_map(Some(sorted.len()))?;
        for (k, v) in sorted {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for SeriesMap<V> {
    /// Any order, as serde reads a `HashMap` (which also caps the capacity it trusts a
    /// corrupt length with).
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Inner::deserialize(deserializer).map(SeriesMap)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn encodes_as_the_sorted_btree_map_did_whatever_the_insertion_order() {
        let keys = ["pump-10/temperature", "pump-2/vibration", "a", "pump-1/temperature"];
        let btree: BTreeMap<String, u32> =
            keys.iter().enumerate().map(|(i, k)| (k.to_string(), i as u32)).collect();
        let mut forward = SeriesMap::default();
        let mut backward = SeriesMap::default();
        for (i, k) in keys.iter().enumerate() {
            forward.insert(k.to_string(), i as u32);
        }
        for (i, k) in keys.iter().enumerate().rev() {
            backward.insert(k.to_string(), i as u32);
        }
        let expected = postcard::to_stdvec(&btree).unwrap();
        assert_eq!(postcard::to_stdvec(&forward).unwrap(), expected);
        assert_eq!(postcard::to_stdvec(&backward).unwrap(), expected);
        let decoded: SeriesMap<u32> = postcard::from_bytes(&expected).unwrap();
        assert_eq!(decoded, forward);
        assert_eq!(
            decoded.sorted_keys(|_| true),
            btree.keys().cloned().collect::<Vec<_>>(),
            "sorted_keys is the B-tree's order"
        );
    }
}
