//! Keys kept as the JSON text they arrived as.
//!
//! The router hands back what `add job` and `add pipeline` sent (`data` and any other keys)
//! without looking inside: [`RawFields`] keeps each value as its JSON text, so a payload is
//! scanned once when its request is read, then stored and handed out as bytes — never built
//! into a tree of [`Value`]s, never encoded again.
//!
//! ```
//! use pypelinin_common::protocol::raw::RawFields;
//! use serde_json::json;
//! let fields: RawFields = serde_json::from_str(r#"{"data": {"text": "é"}, "n": 1}"#).unwrap();
//! assert_eq!(fields.get("data").unwrap().get(), r#"{"text": "é"}"#);
//! assert_eq!(fields.value("n"), Some(json!(1)));
//! assert_eq!(serde_json::to_string(&fields).unwrap(), r#"{"data":{"text": "é"},"n":1}"#);
//! ```

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// Keys and their values as JSON text, in the order they came. Cloning shares them.
///
/// Equality compares keys and texts: `{"a": 1}` and `{"a":1}` are not equal.
///
/// Deserialize it from JSON text or a [`Value`] directly; inside `#[serde(flatten)]` or an
/// internally tagged enum serde buffers values, which cannot hold raw text, so a type that
/// flattens it deserializes a [`Map`] and converts it ([`RawFields::from`]).
#[derive(Clone, Default)]
pub struct RawFields(Arc<Vec<(Box<str>, Box<RawValue>)>>);

impl RawFields {
    /// No keys.
    pub fn new() -> Self {
        Self::default()
    }

    /// The text of `key`'s value.
    pub fn get(&self, key: &str) -> Option<&RawValue> {
        self.0.iter().find(|(k, _)| &**k == key).map(|(_, v)| &**v)
    }

    /// `key`'s value, parsed (`None` when absent).
    pub fn value(&self, key: &str) -> Option<Value> {
        self.get(key)
            .and_then(|raw| serde_json::from_str(raw.get()).ok())
    }

    /// `key`'s value when it is a string.
    pub fn string(&self, key: &str) -> Option<String> {
        self.get(key)
            .and_then(|raw| serde_json::from_str(raw.get()).ok())
    }

    /// Whether `key` is there.
    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// Sets `key` to `raw`, in place of any value it had.
    pub fn insert_raw(&mut self, key: impl Into<String>, raw: Box<RawValue>) {
        let key = key.into();
        let pairs = Arc::make_mut(&mut self.0);
        match pairs.iter_mut().find(|(k, _)| **k == *key) {
            Some((_, v)) => *v = raw,
            None => pairs.push((key.into_boxed_str(), raw)),
        }
    }

    /// Sets `key` to `value`, encoded, in place of any value it had.
    pub fn insert(&mut self, key: impl Into<String>, value: &Value) {
        self.insert_raw(key, raw(value));
    }

    /// Takes `key` out.
    pub fn remove(&mut self, key: &str) -> Option<Box<RawValue>> {
        let at = self.0.iter().position(|(k, _)| &**k == key)?;
        Some(Arc::make_mut(&mut self.0).remove(at).1)
    }

    /// Each key with its text, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &RawValue)> + '_ {
        self.0.iter().map(|(k, v)| (&**k, &**v))
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there is no key.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Bytes of text held (keys and values).
    pub fn text_len(&self) -> usize {
        self.iter().map(|(k, v)| k.len() + v.get().len()).sum()
    }

    /// Every key, parsed.
    pub fn to_map(&self) -> Map<String, Value> {
        self.iter()
            .filter_map(|(k, v)| Some((k.to_owned(), serde_json::from_str(v.get()).ok()?)))
            .collect()
    }

    /// From keys read in one pass over a request (see the request decoder): each text is
    /// copied, not parsed again.
    pub(crate) fn from_pairs<'a>(
        pairs: impl IntoIterator<Item = (Cow<'a, str>, &'a RawValue)>,
    ) -> Self {
        Self(Arc::new(
            pairs
                .into_iter()
                .map(|(k, v)| (k.into_owned().into_boxed_str(), v.to_owned()))
                .collect(),
        ))
    }
}

/// `value` as JSON text (encoding a [`Value`] cannot fail: its keys are strings).
pub(crate) fn raw(value: &Value) -> Box<RawValue> {
    serde_json::value::to_raw_value(value).unwrap_or_else(|_| null())
}

/// The text `null`.
pub(crate) fn null() -> Box<RawValue> {
    RawValue::from_string("null".to_owned()).unwrap_or_else(|_| unreachable!("null is JSON"))
}

impl From<Map<String, Value>> for RawFields {
    fn from(map: Map<String, Value>) -> Self {
        Self(Arc::new(
            map.iter()
                .map(|(k, v)| (k.clone().into_boxed_str(), raw(v)))
                .collect(),
        ))
    }
}

impl PartialEq for RawFields {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len()
            && self
                .iter()
                .zip(other.iter())
                .all(|((ka, va), (kb, vb))| ka == kb && va.get() == vb.get())
    }
}

impl fmt::Debug for RawFields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.iter().map(|(k, v)| (k, v.get())))
            .finish()
    }
}

impl Serialize for RawFields {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.len()))?;
        for (k, v) in self.iter() {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for RawFields {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> Visitor<'de> for Fields {
            type Value = RawFields;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawFields, A::Error> {
                let mut pairs = Vec::with_capacity(map.size_hint().unwrap_or(0));
                while let Some(key) = map.next_key::<String>()? {
                    pairs.push((key.into_boxed_str(), map.next_value::<Box<RawValue>>()?));
                }
                last_wins(&mut pairs);
                Ok(RawFields(Arc::new(pairs)))
            }
        }
        deserializer.deserialize_map(Fields)
    }
}

/// A JSON object read in one pass: its keys, and each value as the text it was, borrowed from
/// the input.
pub(crate) struct RawObject<'a>(pub(crate) Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'a> RawObject<'a> {
    /// Takes `key` out.
    pub(crate) fn take(&mut self, key: &str) -> Option<&'a RawValue> {
        let at = self.0.iter().position(|(k, _)| k == key)?;
        Some(self.0.remove(at).1)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for RawObject<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Object;
        impl<'de> Visitor<'de> for Object {
            type Value = RawObject<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawObject<'de>, A::Error> {
                let mut pairs = Vec::with_capacity(map.size_hint().unwrap_or(4));
                while let Some(Key(key)) = map.next_key()? {
                    pairs.push((key, map.next_value::<&'de RawValue>()?));
                }
                last_wins(&mut pairs);
                Ok(RawObject(pairs))
            }
        }
        deserializer.deserialize_map(Object)
    }
}

/// Drops every pair whose key comes again later: as JSON parsers read an object (and as a
/// map of the values did), the last value of a key is its value. The others keep their order.
/// O(n log n), whatever a hostile request repeats.
fn last_wins<K: AsRef<str>, V>(pairs: &mut Vec<(K, V)>) {
    if pairs.len() < 2 {
        return;
    }
    let mut order: Vec<usize> = (0..pairs.len()).collect();
    order.sort_by(|&a, &b| pairs[a].0.as_ref().cmp(pairs[b].0.as_ref()).then(a.cmp(&b)));
    let mut dropped = vec![false; pairs.len()];
    for w in order.windows(2) {
        if pairs[w[0]].0.as_ref() == pairs[w[1]].0.as_ref() {
            dropped[w[0]] = true;
        }
    }
    if dropped.contains(&true) {
        let mut i = 0;
        pairs.retain(|_| {
            i += 1;
            !dropped[i - 1]
        });
    }
}

/// A key, borrowed unless it had escapes.
pub(crate) struct Key<'a>(pub(crate) Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Key<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }

            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }

            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }

            fn visit_string<E>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn values_stay_the_text_they_came_as() {
        let text = r#"{"b": [1, 2.50, "\u00e9"], "a": {"x": null}}"#;
        let fields: RawFields = serde_json::from_str(text).unwrap();
        assert_eq!(fields.get("b").unwrap().get(), r#"[1, 2.50, "\u00e9"]"#);
        let keys: Vec<&str> = fields.iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["b", "a"], "in the order they came");
        assert_eq!(
            serde_json::to_string(&fields).unwrap(),
            r#"{"b":[1, 2.50, "\u00e9"],"a":{"x": null}}"#
        );
    }

    #[test]
    fn read_from_a_value_or_a_map_too() {
        let value = json!({"data": {"k": "v"}});
        let from_value: RawFields = serde_json::from_value(value.clone()).unwrap();
        let from_map = RawFields::from(value.as_object().cloned().unwrap());
        assert_eq!(from_value, from_map);
        assert_eq!(from_map.to_map(), *value.as_object().unwrap());
    }

    #[test]
    fn insert_replaces_and_remove_takes_out() {
        let mut fields = RawFields::new();
        fields.insert("a", &json!(1));
        let shared = fields.clone();
        fields.insert("a", &json!(2));
        fields.insert("b", &json!("x"));
        assert_eq!(shared.value("a"), Some(json!(1)), "a clone is not changed");
        assert_eq!(fields.value("a"), Some(json!(2)));
        assert_eq!(fields.remove("b").unwrap().get(), r#""x""#);
        assert!(!fields.contains_key("b"));
        assert_eq!(fields.len(), 1);
    }

    #[test]
    fn a_repeated_key_has_its_last_value_as_a_parser_reads_it() {
        let text = r#"{"data": {"x": 1}, "k": 0, "data": {"y": 2}}"#;
        let fields: RawFields = serde_json::from_str(text).unwrap();
        let object: RawObject<'_> = serde_json::from_str(text).unwrap();
        assert_eq!(fields.get("data").unwrap().get(), r#"{"y": 2}"#);
        assert_eq!(fields.len(), 2);
        let keys: Vec<&str> = object.0.iter().map(|(k, _)| &**k).collect();
        assert_eq!(keys, ["k", "data"]);
        let out: Value = serde_json::from_str(&serde_json::to_string(&fields).unwrap()).unwrap();
        assert_eq!(out, serde_json::from_str::<Value>(text).unwrap());
    }

    #[test]
    fn an_escaped_key_is_read_whole() {
        let object: RawObject<'_> = serde_json::from_str(r#"{"a\"b": 1, "c": 2}"#).unwrap();
        let keys: Vec<&str> = object.0.iter().map(|(k, _)| &**k).collect();
        assert_eq!(keys, ["a\"b", "c"]);
        assert!(matches!(object.0[1].0, Cow::Borrowed(_)));
    }
}
