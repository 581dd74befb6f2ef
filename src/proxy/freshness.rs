//! The tag-freshness decision, as pure functions: of what berth holds for a tag, the
//! clock, the tag's TTL, and what the upstream answered (a refused quota is an answer
//! too). `manifests.rs` does the I/O each step asks for; every row of the decision is in
//! the table test below.
//!
//! ```text
//!  held & validated within tag_ttl ─────────────────────────────▶ Fresh (no request)
//!  nothing held ───────────────────────────────────────────────▶ Fetch (counted GET)
//!  held, stale ─▶ HEAD (free) ─┬ same digest ──────────────────▶ Revalidated
//!                              ├ moved to a manifest berth holds ▶ Adopt it
//!                              ├ moved elsewhere / no digest ───▶ Fetch, then on failure:
//!                              │                                   stale copy or refuse
//!                              ├ no such tag ──────────────────▶ Unknown (the upstream
//!                              │                                   outranks a stale copy)
//!                              └ failed ─┬ outage, 429, quota ─▶ Stale (with Warning)
//!                                        └ anything else ─────▶ Refuse
//! ```

use std::time::Duration;

/// What to do for a tag before asking the upstream anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Before {
    /// Validated within its TTL: answer from the store.
    Fresh,
    /// Held but stale: ask the upstream with a HEAD.
    Revalidate,
    /// Nothing usable held: GET it.
    Fetch,
}

/// `validated_ms`: when the held record was last validated (unix milliseconds), `None`
/// when berth holds no record or not the manifest it names; `now_ms` likewise.
pub fn before_asking(validated_ms: Option<u64>, now_ms: u64, ttl: Duration) -> Before {
    match validated_ms {
        None => Before::Fetch,
        Some(at) if Duration::from_millis(now_ms.saturating_sub(at)) < ttl => Before::Fresh,
        Some(_) => Before::Revalidate,
    }
}

/// What the upstream said to the HEAD of a stale tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadSaid {
    /// The digest berth holds.
    Same,
    /// Another digest; `held` when berth holds that manifest and the client accepts its
    /// media type.
    Moved { held: bool },
    /// A 2xx without a digest header.
    NoDigest,
    /// 404: the tag is gone.
    Gone,
    /// No answer, or an error; `stale_ok` for the failures a stale copy may cover
    /// (outage, timeout, 5xx, 429, berth's own quota).
    Failed { stale_ok: bool },
}

/// What to do once the HEAD answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterHead {
    /// Record the tag as validated now; answer the held manifest.
    Revalidated,
    /// Point the tag at the moved-to manifest berth already holds (no GET).
    Adopt,
    /// GET the tag (it moved to something berth does not hold).
    Fetch,
    /// The upstream has no such tag: answer 404 and remember it.
    Unknown,
    /// Answer the held copy, marked stale.
    Stale,
    /// Pass the upstream's failure on.
    Refuse,
}

pub fn after_head(said: HeadSaid) -> AfterHead {
    match said {
        HeadSaid::Same => AfterHead::Revalidated,
        HeadSaid::Moved { held: true } => AfterHead::Adopt,
        HeadSaid::Moved { held: false } | HeadSaid::NoDigest => AfterHead::Fetch,
        HeadSaid::Gone => AfterHead::Unknown,
        HeadSaid::Failed { stale_ok: true } => AfterHead::Stale,
        HeadSaid::Failed { stale_ok: false } => AfterHead::Refuse,
    }
}

/// The GET of a tag that moved failed: the held (older) copy covers the failures a stale
/// copy may cover; anything else is passed on.
pub fn after_failed_refetch(stale_ok: bool) -> AfterHead {
    if stale_ok {
        AfterHead::Stale
    } else {
        AfterHead::Refuse
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(300);
    /// Unix milliseconds.
    const NOW: u64 = 1_000_000_000;

    #[test]
    fn before_asking_every_row() {
        let rows = [
            // (validated, expected)
            (None, Before::Fetch),
            (Some(NOW), Before::Fresh),
            (Some(NOW - 299_999), Before::Fresh),
            (Some(NOW - 300_000), Before::Revalidate), // the TTL is exclusive
            (Some(NOW - 86_400_000), Before::Revalidate),
            // A record from the future (a clock stepped back) counts as just validated.
            (Some(NOW + 60_000), Before::Fresh),
        ];
        for (at, want) in rows {
            assert_eq!(before_asking(at, NOW, TTL), want, "validated_at {at:?}");
        }
        // Measured in milliseconds: a TTL of 1.5 s runs out 1.5 s after, not at a whole
        // second.
        let short = Duration::from_millis(1_500);
        assert_eq!(before_asking(Some(NOW - 1_499), NOW, short), Before::Fresh);
        assert_eq!(
            before_asking(Some(NOW - 1_500), NOW, short),
            Before::Revalidate
        );
        // A zero TTL revalidates every time.
        assert_eq!(
            before_asking(Some(NOW), NOW, Duration::ZERO),
            Before::Revalidate
        );
    }

    #[test]
    fn after_head_every_row() {
        let rows = [
            (HeadSaid::Same, AfterHead::Revalidated),
            (HeadSaid::Moved { held: true }, AfterHead::Adopt),
            (HeadSaid::Moved { held: false }, AfterHead::Fetch),
            (HeadSaid::NoDigest, AfterHead::Fetch),
            (HeadSaid::Gone, AfterHead::Unknown),
            (HeadSaid::Failed { stale_ok: true }, AfterHead::Stale),
            (HeadSaid::Failed { stale_ok: false }, AfterHead::Refuse),
        ];
        for (said, want) in rows {
            assert_eq!(after_head(said), want, "{said:?}");
        }
        assert_eq!(after_failed_refetch(true), AfterHead::Stale);
        assert_eq!(after_failed_refetch(false), AfterHead::Refuse);
    }
}
