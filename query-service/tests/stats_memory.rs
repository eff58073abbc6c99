//! The stats' memory against the real ClickHouse, in a database of its own, driven by hand:
//! polls and loads at chosen moments, changelog rows written as `event_stats` writes them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use videocount_aggregates::{Moments, Registry, Sample};
use videocount_clickhouse::rows::{Grain, STATS_CHANGES, StatsRow, stats_block};
use videocount_clickhouse::{ClickHouse, ClickHouseConfig, schema};
use videocount_query::Segment;
use videocount_query_service::memory::ReplicaSync;
use videocount_query_service::stats_memory::{StatsMemory, StatsMemoryConfig, StatsMemoryStats};

/// One watch time of 1.0 in `minute` of `video`, as a row of `stats_minute`.
fn one_value(registry: &Registry, video: &str, minute: u32) -> StatsRow {
    let aggregate = registry.get(registry.by_name("moments").unwrap());
    let mut state = aggregate.create();
    aggregate.update(&mut state, Sample { value: Some(1.0), viewer_id: None });
    let mut summary = Moments::default();
    summary.add(Some(1.0));
    StatsRow {
        video_id: video.into(),
        event_type: "watch_time".into(),
        aggregate: "moments".into(),
        bucket: minute,
        count: summary.count,
        value_count: summary.value_count,
        sum: summary.sum,
        min: summary.min,
        max: summary.max,
        state: aggregate.encode(&state),
    }
}

/// Writes an epoch's minute rows as `event_stats` does (the changelog and the minute table;
/// no hour or day rows: the questions below ask for one minute), then commits it.
async fn write_epoch(clickhouse: &ClickHouse, epoch: u64, rows: Vec<StatsRow>, commit: bool) {
    for table in [STATS_CHANGES, "stats_minute"] {
        let block = stats_block(Grain::Minute, epoch, false, &mut rows.clone());
        clickhouse.insert_native(table, block.body).await.unwrap();
    }
    if commit {
        clickhouse
            .execute(&format!("INSERT INTO checkpoint_commits VALUES ('event_stats', 't', {epoch}, now())"))
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs ClickHouse: make up, then make test"]
async fn a_key_loaded_while_a_poll_decodes_gets_that_polls_epochs() {
    let suffix: u32 = rand::rng().random();
    let clickhouse = ClickHouse::new(ClickHouseConfig {
        database: format!("test_stats_memory_{suffix:08x}"),
        ..ClickHouseConfig::default()
    });
    schema::apply(&clickhouse).await.expect("schema applied (is `make up` running?)");
    let registry = Registry::builtin();
    let moments = registry.by_name("moments").unwrap();
    let minute: u32 = 1_795_000_020;
    const KEYS: usize = 300;
    // Epoch 1: a value in `minute` of every key k.., and of the key h. Epoch 2: another value
    // of every k, and 100,000 minutes of h, which the poll decodes (h is held) for a while.
    let ks = |epoch_rows: &mut Vec<StatsRow>| {
        epoch_rows.extend((0..KEYS).map(|i| one_value(&registry, &format!("k{i}"), minute)))
    };
    let mut first = vec![one_value(&registry, "h", minute)];
    ks(&mut first);
    write_epoch(&clickhouse, 1, first, true).await;
    let mut second: Vec<StatsRow> = (1..=100_000).map(|m| one_value(&registry, "h", minute + 60 * m)).collect();
    ks(&mut second);
    write_epoch(&clickhouse, 2, second, false).await;

    let config = StatsMemoryConfig {
        poll: Duration::from_secs(60),
        budget_bytes: 1 << 34,
        job: "event_stats".into(),
        warm_up: false,
    };
    let memory = Arc::new(StatsMemory::new(
        clickhouse.clone(),
        Registry::builtin(),
        config,
        StatsMemoryStats::default(),
        Arc::new(ReplicaSync::default()),
    ));
    memory.poll().await.unwrap();
    assert_eq!(memory.applied(), Some(1));
    memory.load(&("h".into(), "watch_time".into(), moments)).await.unwrap();
    clickhouse.execute("INSERT INTO checkpoint_commits VALUES ('event_stats', 't', 2, now())").await.unwrap();

    // The poll applying epoch 2, and the k keys loading one after the other meanwhile: those
    // installed as of epoch 1 while the poll decodes must get epoch 2 from it.
    let poll = {
        let memory = memory.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            memory.poll().await.unwrap();
            started.elapsed()
        })
    };
    let mut loads = Vec::new();
    for i in 0..KEYS {
        let memory = memory.clone();
        loads.push(tokio::spawn(async move { memory.load(&(format!("k{i}"), "watch_time".into(), moments)).await }));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let took = poll.await.unwrap();
    for load in loads {
        load.await.unwrap().unwrap();
    }
    assert_eq!(memory.applied(), Some(2));
    let aggregate = registry.get(moments);
    let one_minute = [Segment { grain: Grain::Minute, start_s: u64::from(minute), end_s: u64::from(minute) + 60 }];
    let wrong: Vec<(usize, Option<f64>)> = (0..KEYS)
        .map(|i| {
            let (state, _) =
                memory.merge(&format!("k{i}"), "watch_time", moments, &one_minute).expect("held and fresh");
            (i, aggregate.finish(&state, "count"))
        })
        .filter(|(_, count)| *count != Some(2.0))
        .collect();
    eprintln!("the poll took {took:?} while {KEYS} keys loaded");
    assert!(wrong.is_empty(), "{} keys answer another count than 2 from memory: {wrong:?}", wrong.len());
    schema::drop_database(&clickhouse).await.unwrap();
}
