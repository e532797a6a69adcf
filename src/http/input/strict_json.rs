//! A JSON parse that refuses an object with the same key twice, at any depth.
//!
//! `serde_json::Value` keeps the last of repeated keys, so `{"amount": "1.00", "amount": "900.00"}` would
//! mean whatever the last parser in a chain decides. The contract refuses such a body (400
//! `invalid_request`); this visitor builds the same `Value` and fails on the first repeated key.
//!
//! A number is read by its value, not its spelling: `3.0` and `3e0` are the integer 3 (as JSON Schema,
//! and so the OpenAPI document, reads them), so an integer field takes them like `3`.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// Parses `bytes` as one JSON value, refusing duplicate object keys.
pub fn parse(bytes: &[u8]) -> Result<Value, serde_json::Error> {
    serde_json::from_slice::<Strict>(bytes).map(|strict| strict.0)
}

/// A `Value` whose objects had no repeated key.
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Strict, D::Error> {
        deserializer.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        if let Some(integer) = exact_integer(v) {
            return Ok(integer);
        }
        Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("a number that is not finite"))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(StrictVisitor)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        while let Some(Strict(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                return Err(de::Error::custom(format_args!("duplicate key {key:?}")));
            }
            let Strict(value) = map.next_value()?;
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

/// The integer a float spells, when it is one and every integer up to it is exact in an `f64`.
fn exact_integer(v: f64) -> Option<Value> {
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
    if v.fract() != 0.0 || v.abs() > EXACT {
        return None;
    }
    // In range and integral: the casts are exact.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Some(if v >= 0.0 {
        Value::from(v as u64)
    } else {
        Value::from(v as i64)
    })
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn repeated_keys_are_refused_at_any_depth() {
        assert!(parse(br#"{"a": 1, "a": 2}"#).is_err());
        assert!(parse(br#"{"a": {"b": 1, "b": 1}}"#).is_err());
        assert!(parse(br#"{"a": [{"b": 1}, {"c": 1, "c": 2}]}"#).is_err());
        // The same key in sibling objects is no repetition.
        assert!(parse(br#"{"a": [{"b": 1}, {"b": 2}]}"#).is_ok());
    }

    #[test]
    fn builds_the_value_serde_json_builds() {
        let text = br#"{"s": "x\u00e9", "n": -3, "u": 18446744073709551615, "f": 1.25,
            "b": [true, false, null], "o": {"k": {}}}"#;
        let strict = parse(text).map_err(|e| e.to_string());
        let plain = serde_json::from_slice::<serde_json::Value>(text).map_err(|e| e.to_string());
        assert_eq!(strict, plain);
        assert!(parse(b"{} x").is_err());
    }

    #[test]
    fn integral_numbers_are_integers_however_spelled() {
        let parsed = parse(br#"[3.0, 3e0, -2.0, 1.5e3, 0.5, 1e300]"#).map_err(|e| e.to_string());
        assert_eq!(parsed, Ok(serde_json::json!([3, 3, -2, 1500, 0.5, 1e300])));
        assert!(parse(b"").is_err());
    }
}
