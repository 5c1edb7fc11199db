//! Readings of the values the `database` import returns, read the same
//! way by every store that uses it.

use crate::{IdMap, Image, database, id_map};

/// A value of a database import.
pub trait DbValue {
    fn integer(&self) -> Option<i64>;
    fn real(&self) -> Option<f64>;
    fn as_text(&self) -> Option<&str>;
    fn from_text(s: String) -> Self;
    fn into_text(self) -> Option<String>;
}

/// The readings of a value type whose numeric and text cases are named
/// `Integer`, `Real` and `Text`.
macro_rules! db_value {
    ($value:ty) => {
        impl DbValue for $value {
            fn integer(&self) -> Option<i64> {
                match self {
                    Self::Integer(i) => Some(*i),
                    _ => None,
                }
            }
            fn real(&self) -> Option<f64> {
                match self {
                    Self::Real(r) => Some(*r),
                    _ => None,
                }
            }
            fn as_text(&self) -> Option<&str> {
                match self {
                    Self::Text(t) => Some(t),
                    _ => None,
                }
            }
            fn from_text(s: String) -> Self {
                Self::Text(s)
            }
            fn into_text(self) -> Option<String> {
                match self {
                    Self::Text(t) => Some(t),
                    _ => None,
                }
            }
        }
    };
}

db_value!(database::Value);

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

/// Rows of `image_id, size, hits, last_accessed, last_modified`, by id. A
/// row without usable times is left out: the driver then asks the file.
pub fn image_rows<V: DbValue>(rows: Vec<Vec<V>>) -> IdMap<Image> {
    let mut recorded = id_map(rows.len());
    for row in rows {
        let mut row = row.into_iter();
        let (Some(id), Some(size), Some(hits), Some(accessed), Some(modified)) =
            (row.next(), row.next(), row.next(), row.next(), row.next())
        else {
            continue;
        };
        if let (Some(id), Some(last_accessed), Some(last_modified)) =
            (id.into_text(), as_f64(&accessed), as_f64(&modified))
        {
            let image = Image {
                size: as_u64(&size),
                hits: as_u64(&hits),
                last_accessed,
                last_modified,
            };
            recorded.insert(id, image);
        }
    }
    recorded
}

/// Rows of `image_id, size`, by id.
pub fn size_rows<V: DbValue>(rows: Vec<Vec<V>>) -> IdMap<u64> {
    let mut recorded = id_map(rows.len());
    for row in rows {
        let mut row = row.into_iter();
        if let (Some(id), Some(size)) = (row.next().and_then(V::into_text), row.next()) {
            recorded.insert(id, as_u64(&size));
        }
    }
    recorded
}
