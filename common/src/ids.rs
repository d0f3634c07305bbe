//! Job and pipeline identifiers.
//!
//! The router creates ids as uuid4 written as 32 lowercase hex digits (Python's `uuid4().hex`).
//! Clients may send any string back as an id: an id the router does not know is simply
//! unknown, never a syntax error, so ids are kept as opaque strings on the wire.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        ///
        /// Its text is shared: the router keeps one id in several tables (its record, its
        /// queue, its durable index), and a clone costs a count, not a copy.
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            /// A fresh random id: uuid4 as 32 lowercase hex digits.
            pub fn generate() -> Self {
                Self(Arc::from(&*uuid::Uuid::new_v4().simple().to_string()))
            }

            /// The id as sent on the wire.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                Self(Arc::from(s))
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(Arc::from(s))
            }
        }

        /// A plain JSON string.
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct Text;
                impl serde::de::Visitor<'_> for Text {
                    type Value = $name;

                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str("an id (a string)")
                    }

                    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<$name, E> {
                        Ok($name::from(v))
                    }
                }
                deserializer.deserialize_str(Text)
            }
        }
    };
}

id_type!(
    /// Identifies a job queued on the router.
    JobId
);
id_type!(
    /// Identifies a pipeline queued on the router.
    PipelineId
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_uuid4_hex() {
        let id = JobId::generate();
        let s = id.as_str();
        assert_eq!(s.len(), 32);
        assert!(s
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        // The version nibble of a uuid4.
        assert_eq!(&s[12..13], "4");
        assert_ne!(JobId::generate(), id);
    }

    #[test]
    fn ids_serialize_as_plain_strings() {
        let id = PipelineId::from("abc");
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"abc\"");
    }
}
