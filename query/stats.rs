//! `getStats`: the stored states of a function's aggregate over a range, merged with the code the
//! job uses and finished. Per bucket, the newest compacted state and the states of later epochs.

use videocount_clickhouse::states::{StoredState, live_states};

use videocount_aggregates::{Function, Registry, State};

use crate::{Bounds, QueryError, Reader, TimeRange, bucket_condition, check_ids, segments};

/// The answer to a stats query.
#[derive(Clone, Debug, PartialEq)]
pub struct StatsAnswer {
    /// `None` when the function has no value without data (sum, min, max, avg, pNN of no
    /// values); `count` and `uniq` of nothing are 0.
    pub value: Option<f64>,
    /// How many stored states were merged.
    pub states: usize,
}

impl Reader {
    /// An error naming the functions `event_stats` keeps for `event_type` when `function` has
    /// no answer there: it is kept when a configured function reads the same aggregate from the
    /// same input (`avg` with `sum`, `p75` with `p50`). Otherwise it is answered only from states
    /// that events naming a function in their `function` field fed (`states > 0` with an
    /// aggregate the config does not feed for the type); where the config feeds the aggregate
    /// from another input (`max` of views, whose `count` feeds the same moments), the states
    /// hold only incidental values, and that is an error too.
    fn check_kept(&self, event_type: &str, function: &Function, states: usize) -> Result<(), QueryError> {
        let kept = self.functions.functions(event_type);
        if kept.iter().any(|f| f.aggregate == function.aggregate && f.input == function.input) {
            return Ok(());
        }
        let fed_by_config = kept.iter().any(|f| f.aggregate == function.aggregate);
        if states > 0 && !fed_by_config {
            return Ok(());
        }
        let names: Vec<&str> = kept.iter().map(|f| f.name.as_str()).collect();
        let reason = if fed_by_config {
            format!("configure {} for it to be kept", function.name)
        } else {
            format!("and no event in this range named {} in its function field", function.name)
        };
        Err(QueryError::NotKept(format!(
            "{} is not kept for event type {event_type}: event_stats applies {} to it (its --functions config), {reason}",
            function.name,
            names.join(", "),
        )))
    }

    /// `getStats`: `function` over the events of `event_type` (as kept by `event_stats`).
    pub async fn stats(
        &self,
        video_id: &str,
        event_type: &str,
        function: &str,
        range: TimeRange,
    ) -> Result<StatsAnswer, QueryError> {
        check_ids(video_id, event_type)?;
        let function = self.function(function)?;
        let aggregate = self.registry.get(function.aggregate);
        let segments = segments(range);
        if segments.is_empty() {
            return self.stats_answer(event_type, &function, &aggregate.create(), 0);
        }
        let (parts, bounds): (Vec<String>, Vec<Bounds>) = segments
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let (condition, bounds) = bucket_condition(s);
                let table = s.grain.stats_table();
                let sql = format!(
                    "SELECT state, toUInt32({i}) AS segment, toUInt32({column}) AS bucket, epoch, compacted \
                     FROM {table} WHERE video_id = ? AND event_type = ? AND aggregate = ? AND {condition} \
                     AND (compacted = 1 OR state != '')",
                    column = s.grain.column()
                );
                (sql, bounds)
            })
            .unzip();
        // A fixed order, so that the same rows always merge to the same answer.
        let sql = format!(
            "SELECT state, segment, bucket, epoch, compacted FROM ({}) ORDER BY segment, bucket, compacted DESC, epoch",
            parts.join(" UNION ALL ")
        );
        let mut query = self.clickhouse.client().query(&sql);
        for bounds in bounds {
            query = bounds.bind(query.bind(video_id).bind(event_type).bind(aggregate.name()));
        }
        let rows: Vec<StoredState> = self.clickhouse.fetch_all(query).await?;
        let mut merged = aggregate.create();
        let mut states = 0;
        for group in rows.chunk_by(|a, b| (a.segment, a.bucket) == (b.segment, b.bucket)) {
            for row in live_states(group) {
                let state = aggregate.decode(&row.state).map_err(|e| QueryError::Corrupt(e.to_string()))?;
                aggregate.merge(&mut merged, &state);
                states += 1;
            }
        }
        self.stats_answer(event_type, &function, &merged, states)
    }

    /// The answer of `function` from the `merged` state of `states` stored states (from
    /// ClickHouse or from the service's memory), or the error saying it is not kept.
    pub fn stats_answer(
        &self,
        event_type: &str,
        function: &Function,
        merged: &State,
        states: usize,
    ) -> Result<StatsAnswer, QueryError> {
        self.check_kept(event_type, function, states)?;
        let value = self.registry.get(function.aggregate).finish(merged, &function.name);
        Ok(StatsAnswer { value, states })
    }

    /// The aggregates states are merged with.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}
