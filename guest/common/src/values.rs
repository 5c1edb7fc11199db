//! Readings of the values the `sqlite` and `database` imports return.
//! They are two WIT types (the database's has a `boolean` case) with the
//! same numeric and text cases, read the same way by every store.

use crate::{database, sqlite};

/// A value of either import.
pub trait DbValue {
    fn integer(&self) -> Option<i64>;
    fn real(&self) -> Option<f64>;
    fn as_text(&self) -> Option<&str>;
    fn from_text(s: String) -> Self;
}

impl DbValue for sqlite::Value {
    fn integer(&self) -> Option<i64> {
        match self {
            sqlite::Value::Integer(i) => Some(*i),
            _ => None,
        }
    }
    fn real(&self) -> Option<f64> {
        match self {
            sqlite::Value::Real(r) => Some(*r),
            _ => None,
        }
    }
    fn as_text(&self) -> Option<&str> {
        match self {
            sqlite::Value::Text(t) => Some(t),
            _ => None,
        }
    }
    fn from_text(s: String) -> Self {
        sqlite::Value::Text(s)
    }
}

impl DbValue for database::Value {
    fn integer(&self) -> Option<i64> {
        match self {
            database::Value::Integer(i) => Some(*i),
            _ => None,
        }
    }
    fn real(&self) -> Option<f64> {
        match self {
            database::Value::Real(r) => Some(*r),
            _ => None,
        }
    }
    fn as_text(&self) -> Option<&str> {
        match self {
            database::Value::Text(t) => Some(t),
            _ => None,
        }
    }
    fn from_text(s: String) -> Self {
        database::Value::Text(s)
    }
}

/// A text value.
pub fn text<V: DbValue>(s: &str) -> V {
    V::from_text(s.to_string())
}

/// A count or size: negative and non-numeric values read as 0.
pub fn as_u64<V: DbValue>(v: &V) -> u64 {
    match (v.integer(), v.real()) {
        (Some(i), _) => i.max(0) as u64,
        (_, Some(r)) if r > 0.0 => r as u64,
        _ => 0,
    }
}

/// A time; `None` unless the value is a number.
pub fn as_f64<V: DbValue>(v: &V) -> Option<f64> {
    v.real().or_else(|| v.integer().map(|i| i as f64))
}

/// The first column of the first row as text, if it is a non-empty text
/// (a recorded checksum).
pub fn first_text<V: DbValue>(rows: &[Vec<V>]) -> Option<String> {
    rows.first()
        .and_then(|r| r.first())
        .and_then(V::as_text)
        .filter(|t| !t.is_empty())
        .map(str::to_string)
}
