//! JSON documents with one value per key.
//!
//! RFC 8259 leaves duplicate object keys undefined and serde_json keeps the last one, so
//! `{"oauth_token": "a", "oauth_token": "b"}` would be stored as `b` while another parser (or
//! a reviewer) reads `a`. Bodies and token objects with a repeated key are refused instead.

use std::{cell::RefCell, collections::HashSet, fmt};

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

/// The path of the first key that appears twice in one object of this JSON text (`kind`,
/// `oauth1_token.oauth_token`, `items[2].id`), or `None`. Keys are compared after unescaping
/// (`"a"` and `"\u0061"` are the same key). Text that is not valid JSON gives `None`: the
/// caller's own parse reports it.
pub fn duplicate_key(json: &[u8]) -> Option<String> {
    let found = RefCell::new(None);
    let mut de = serde_json::Deserializer::from_slice(json);
    let _ = Walk { path: String::new(), found: &found }.deserialize(&mut de);
    found.into_inner()
}

/// Visits every value, remembering the path of the first repeated key (then stops).
struct Walk<'a> {
    path: String,
    found: &'a RefCell<Option<String>>,
}

impl Walk<'_> {
    fn child(&self, segment: &str) -> String {
        if self.path.is_empty() { segment.to_string() } else { format!("{}.{segment}", self.path) }
    }
}

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_i128<E>(self, _: i128) -> Result<(), E> {
        Ok(())
    }
    fn visit_u128<E>(self, _: u128) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_none<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0usize;
        while seq.next_element_seed(Walk { path: format!("{}[{i}]", self.path), found: self.found })?.is_some() {
            i += 1;
        }
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut keys = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            let path = self.child(&key);
            if !keys.insert(key) {
                *self.found.borrow_mut() = Some(path);
                return Err(de::Error::custom("duplicate key"));
            }
            map.next_value_seed(Walk { path, found: self.found })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_first_repeated_key_with_its_path() {
        assert_eq!(duplicate_key(br#"{"a": 1, "b": 2}"#), None);
        assert_eq!(duplicate_key(br#"{"a": 1, "a": 2}"#).as_deref(), Some("a"));
        assert_eq!(duplicate_key(br#"{"a": 1, "\u0061": 2}"#).as_deref(), Some("a"));
        assert_eq!(duplicate_key(br#"{"o": {"x": 1, "y": {"x": 1}, "x": 3}}"#).as_deref(), Some("o.x"));
        assert_eq!(duplicate_key(br#"{"l": [{"k": 1}, {"k": 1, "k": 2}]}"#).as_deref(), Some("l[1].k"));
        assert_eq!(duplicate_key(br#"[{"k": 1}, {"k": 1}]"#), None);
        assert_eq!(duplicate_key(br#"{"n": 123456789012345678901, "m": 1.50, "s": "x"}"#), None);
        assert_eq!(duplicate_key(b"{not json"), None);
    }
}
