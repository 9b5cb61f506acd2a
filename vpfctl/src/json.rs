//! A minimal JSON value and compact serializer for `--json` output (one
//! object per line, keys in insertion order).

use std::fmt::Write;

/// A JSON value.
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    /// `null`
    Null,
    /// `true` / `false`
    Bool(bool),
    /// An unsigned integer.
    U(u64),
    /// A signed integer.
    I(i64),
    /// A float (printed with 3 decimals; NaN and infinities as `null`).
    F(f64),
    /// A string.
    S(String),
    /// An array.
    A(Vec<Json>),
    /// An object, in key order given.
    O(Vec<(String, Json)>),
}

impl Json {
    /// An empty object.
    pub fn obj() -> Json {
        Json::O(Vec::new())
    }

    /// Append `key: value` to an object (no-op for other kinds).
    pub fn set(&mut self, key: &str, value: impl Into<Json>) -> &mut Self {
        if let Json::O(v) = self {
            v.push((key.to_string(), value.into()));
        }
        self
    }

    /// Builder form of [`Json::set`].
    pub fn with(mut self, key: &str, value: impl Into<Json>) -> Self {
        self.set(key, value);
        self
    }

    /// The value of `key` in an object.
    pub fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::O(v) => v.iter().find(|(k, _)| k == key).map(|(_, x)| x),
            _ => None,
        }
    }

    /// Compact serialization.
    pub fn to_string_compact(&self) -> String {
        let mut s = String::new();
        self.write(&mut s);
        s
    }

    fn write(&self, out: &mut String) {
        match self {
            Json::Null => out.push_str("null"),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::U(n) => {
                let _ = write!(out, "{n}");
            }
            Json::I(n) => {
                let _ = write!(out, "{n}");
            }
            Json::F(f) if f.is_finite() => {
                let _ = write!(out, "{f:.3}");
            }
            Json::F(_) => out.push_str("null"),
            Json::S(s) => write_str(out, s),
            Json::A(v) => {
                out.push('[');
                for (i, x) in v.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    x.write(out);
                }
                out.push(']');
            }
            Json::O(v) => {
                out.push('{');
                for (i, (k, x)) in v.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write_str(out, k);
                    out.push(':');
                    x.write(out);
                }
                out.push('}');
            }
        }
    }
}

fn write_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

impl From<bool> for Json {
    fn from(v: bool) -> Self {
        Json::Bool(v)
    }
}
impl From<u64> for Json {
    fn from(v: u64) -> Self {
        Json::U(v)
    }
}
impl From<u32> for Json {
    fn from(v: u32) -> Self {
        Json::U(v.into())
    }
}
impl From<u16> for Json {
    fn from(v: u16) -> Self {
        Json::U(v.into())
    }
}
impl From<u8> for Json {
    fn from(v: u8) -> Self {
        Json::U(v.into())
    }
}
impl From<usize> for Json {
    fn from(v: usize) -> Self {
        Json::U(v as u64)
    }
}
impl From<i64> for Json {
    fn from(v: i64) -> Self {
        Json::I(v)
    }
}
impl From<i32> for Json {
    fn from(v: i32) -> Self {
        Json::I(v.into())
    }
}
impl From<f64> for Json {
    fn from(v: f64) -> Self {
        Json::F(v)
    }
}
impl From<&str> for Json {
    fn from(v: &str) -> Self {
        Json::S(v.to_string())
    }
}
impl From<String> for Json {
    fn from(v: String) -> Self {
        Json::S(v)
    }
}
impl<T: Into<Json>> From<Vec<T>> for Json {
    fn from(v: Vec<T>) -> Self {
        Json::A(v.into_iter().map(Into::into).collect())
    }
}
impl<T: Into<Json>> From<Option<T>> for Json {
    fn from(v: Option<T>) -> Self {
        v.map(Into::into).unwrap_or(Json::Null)
    }
}

/// `0x…` hex string of an address, the form addresses take in JSON output.
pub fn hex(v: u64) -> Json {
    Json::S(format!("{v:#x}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_compactly_in_order() {
        let j = Json::obj()
            .with("b", 1u32)
            .with("a", "x\"y\\\n\u{1}")
            .with("list", vec![1u64, 2])
            .with("none", Option::<u8>::None)
            .with("t", true)
            .with("f", 1.5f64)
            .with("neg", -3i64)
            .with("h", hex(0x1000))
            .with("o", Json::obj());
        assert_eq!(
            j.to_string_compact(),
            r#"{"b":1,"a":"x\"y\\\n\u0001","list":[1,2],"none":null,"t":true,"f":1.500,"neg":-3,"h":"0x1000","o":{}}"#
        );
        assert_eq!(j.get("b"), Some(&Json::U(1)));
        assert_eq!(j.get("zz"), None);
        assert_eq!(Json::F(f64::NAN).to_string_compact(), "null");
    }
}
