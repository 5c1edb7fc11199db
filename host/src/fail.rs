//! What the cache does when its driver fails: the fail policy.
//!
//! | policy | the library ([`ImageCache`](crate::ImageCache)) | a server (`image-cache serve`) |
//! | --- | --- | --- |
//! | `fail-closed` (default) | the error reaches the caller | the download gets the error (5xx) |
//! | `fail-open` | as `fail-closed`: a library has nothing to serve around the cache | a download whose lookup fails is fetched from the upstream for the client, not cached |
//! | `fail-reload` | a call that faults ([`Error::DriverFault`](crate::Error::DriverFault)) rolls the driver back to the previous one (when there was a swap) and is tried once more on it | the same, then as `fail-closed` |

use std::fmt;
use std::str::FromStr;

/// What happens when the driver fails (see the module's table).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum FailPolicy {
    /// `fail-closed`: the error reaches the caller (the client). Today's
    /// behaviour of every call, and the default.
    #[default]
    Closed,
    /// `fail-open`: a server whose driver is failing serves downloads from
    /// its upstream without caching them. The library has no upstream: it
    /// behaves as [`FailPolicy::Closed`].
    Open,
    /// `fail-reload`: a call whose driver faults rolls the cache back to
    /// the driver that served before the last swap and runs the call once
    /// more on it (metadata calls and session opens; never a write
    /// session under way). Without a previous driver, or when the retry
    /// fails too, the error stands. A driver put back after a fault is not
    /// rolled back again (to the one that faulted) until the next swap or
    /// a rollback by hand.
    Reload,
}

impl FailPolicy {
    /// Every policy, in the order of the documentation.
    pub const ALL: [FailPolicy; 3] = [FailPolicy::Closed, FailPolicy::Open, FailPolicy::Reload];

    /// The policy's name: `fail-closed`, `fail-open` or `fail-reload`.
    pub fn as_str(self) -> &'static str {
        match self {
            FailPolicy::Closed => "fail-closed",
            FailPolicy::Open => "fail-open",
            FailPolicy::Reload => "fail-reload",
        }
    }
}

impl fmt::Display for FailPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not a fail policy (the text as given).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a fail policy (fail-closed, fail-open or fail-reload)")]
pub struct UnknownFailPolicy(pub String);

impl FromStr for FailPolicy {
    type Err = UnknownFailPolicy;

    /// `fail-closed`, `fail-open` or `fail-reload` (surrounding blanks and
    /// case ignored).
    fn from_str(s: &str) -> Result<FailPolicy, UnknownFailPolicy> {
        let name = s.trim();
        FailPolicy::ALL
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(name))
            .ok_or_else(|| UnknownFailPolicy(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_others_are_refused() {
        for p in FailPolicy::ALL {
            assert_eq!(p.as_str().parse::<FailPolicy>(), Ok(p));
            assert_eq!(p.to_string(), p.as_str());
        }
        assert_eq!(" FAIL-Open ".parse::<FailPolicy>(), Ok(FailPolicy::Open));
        assert_eq!(FailPolicy::default(), FailPolicy::Closed);
        for bad in ["", "open", "closed", "fail-", "fail-retry"] {
            let e = bad.parse::<FailPolicy>().unwrap_err();
            assert_eq!(e, UnknownFailPolicy(bad.to_string()));
            assert!(
                e.to_string()
                    .contains("fail-closed, fail-open or fail-reload")
            );
        }
    }
}
