//! Time buckets (minute, hour, day) of an event's time, as the tables store them, and the
//! routing of a video to a worker. Deterministic in their inputs: a re-run epoch routes and
//! buckets every event the same way.

/// Start of the event's minute, in seconds since the epoch (a ClickHouse `DateTime`).
pub fn minute_start(ts_ms: u64) -> u32 {
    ((ts_ms / 60_000) * 60) as u32
}

/// Start of the event's hour, in seconds since the epoch.
pub fn hour_start(ts_ms: u64) -> u32 {
    ((ts_ms / 3_600_000) * 3600) as u32
}

/// The event's day, in days since 1970-01-01 (a ClickHouse `Date`).
pub fn day_number(ts_ms: u64) -> u16 {
    (ts_ms / 86_400_000) as u16
}

/// The worker that counts a video, of `peers` workers. A fixed hash, so that a restarted job
/// routes every video to the same worker and re-writes identical blocks.
pub fn route(video_id: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(video_id.as_bytes())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn buckets_at_boundaries() {
        // 2026-11-27T23:59:59.999Z and the millisecond after it.
        let before = 1_795_823_999_999_u64;
        let after = before + 1;
        assert_eq!(minute_start(before), 1_795_823_940);
        assert_eq!(minute_start(after), 1_795_824_000);
        assert_eq!(hour_start(before), 1_795_820_400);
        assert_eq!(hour_start(after), 1_795_824_000);
        assert_eq!(day_number(before) + 1, day_number(after));
        assert_eq!(u64::from(day_number(after)) * 86_400, 1_795_824_000);
        assert_eq!(minute_start(0), 0);
        assert_eq!(minute_start(59_999), 0);
        assert_eq!(minute_start(60_000), 60);
    }

    proptest! {
        #[test]
        fn buckets_nest(ts in 0u64..4_000_000_000_000) {
            let minute = u64::from(minute_start(ts));
            prop_assert!(minute * 1000 <= ts && ts < minute * 1000 + 60_000);
            let hour = u64::from(hour_start(ts));
            prop_assert!(hour <= minute && minute < hour + 3600);
            let day = u64::from(day_number(ts)) * 86_400;
            prop_assert!(day <= hour && hour < day + 86_400);
        }

        #[test]
        fn routing_is_stable(id in "[A-Za-z0-9_-]{1,64}") {
            prop_assert_eq!(route(&id), route(&id.clone()));
        }
    }
}
