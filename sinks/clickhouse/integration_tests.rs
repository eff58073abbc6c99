//! The exactly-once building blocks against the real ClickHouse that `make up` starts, each test
//! in a database of its own: a repeated block is dropped, a cut-off block inserts nothing, and
//! checkpoints read back as written. (The whole job is tested in `e2e/tests`.)

use rand::Rng;

use crate::checkpoints::{self, Range, commit_block, plan_block};
use crate::rows::{Grain, counts_block};
use crate::{ClickHouse, ClickHouseConfig, SinkError, schema};

async fn fresh_database(name: &str) -> ClickHouse {
    let suffix: u32 = rand::rng().random();
    let clickhouse = ClickHouse::new(ClickHouseConfig {
        database: format!("test_sink_{name}_{suffix:08x}"),
        ..ClickHouseConfig::default()
    });
    assert_eq!(
        schema::missing_tables(&clickhouse).await.unwrap(),
        schema::table_names(schema::SCHEMA_SQL),
        "nothing before the schema"
    );
    schema::apply(&clickhouse).await.expect("schema applied (is `make up` running?)");
    schema::apply(&clickhouse).await.expect("the schema applies twice");
    assert!(schema::missing_tables(&clickhouse).await.unwrap().is_empty());
    clickhouse
}

#[derive(clickhouse::Row, serde::Deserialize)]
struct Sum {
    total: u64,
}

async fn total(clickhouse: &ClickHouse) -> u64 {
    let rows: Vec<Sum> = clickhouse
        .fetch_all(clickhouse.client().query("SELECT toUInt64(sum(count)) AS total FROM event_counts_minute"))
        .await
        .unwrap();
    rows[0].total
}

#[tokio::test]
#[ignore = "needs ClickHouse: make up, then make test"]
async fn a_repeated_block_is_dropped_and_a_cut_off_block_inserts_nothing() {
    let clickhouse = fresh_database("dedup").await;
    let rows = || {
        vec![
            (("v1".to_string(), "view".to_string(), 1_795_812_360), 3),
            (("v2".into(), "like".into(), 1_795_812_420), 4),
        ]
    };
    let epoch_7 = counts_block(Grain::Minute, 7, &mut rows());
    clickhouse.insert_native(&epoch_7.table, epoch_7.body.clone()).await.unwrap();
    clickhouse.insert_native(&epoch_7.table, epoch_7.body.clone()).await.unwrap();
    assert_eq!(total(&clickhouse).await, 7, "the re-run of epoch 7 is dropped");

    // The same counts in another epoch are new events, not a repeat.
    let epoch_8 = counts_block(Grain::Minute, 8, &mut rows());
    clickhouse.insert_native(&epoch_8.table, epoch_8.body.clone()).await.unwrap();
    assert_eq!(total(&clickhouse).await, 14);

    // A body cut short (the job killed mid-send) is refused whole, and not worth retrying.
    let epoch_9 = counts_block(Grain::Minute, 9, &mut rows());
    let cut = epoch_9.body.slice(..epoch_9.body.len() - 9);
    let error = clickhouse.insert_native(&epoch_9.table, cut).await.unwrap_err();
    assert!(matches!(error, SinkError::Rejected(_)), "{error}");
    assert_eq!(total(&clickhouse).await, 14, "nothing of the cut-off block is counted");

    schema::drop_database(&clickhouse).await.unwrap();
}

#[tokio::test]
#[ignore = "needs ClickHouse: make up, then make test"]
async fn checkpoints_read_back_as_written() {
    let clickhouse = fresh_database("checkpoints").await;
    let empty = checkpoints::load(&clickhouse, "view_counts", "t").await.unwrap();
    assert_eq!(empty.last_committed, None);
    // The first run is generation 1: its epochs start at 1 << 32.
    assert_eq!((empty.generation, empty.next_epoch), (1, G));
    assert!(empty.pending.is_empty() && empty.resume.is_empty());

    let range = |partition, start, end| Range { partition, start, end };
    for (epoch, mut ranges) in
        [(1, vec![range(0, 0, 10), range(1, 0, 5)]), (2, vec![range(1, 5, 8)]), (3, vec![range(0, 10, 12)])]
    {
        let plan = plan_block("view_counts", "t", epoch, 2, &mut ranges);
        clickhouse.insert_native(&plan.table, plan.body).await.unwrap();
    }
    let commit = commit_block("view_counts", "t", 1, 1_795_812_360);
    clickhouse.insert_native(&commit.table, commit.body).await.unwrap();
    // Another job's checkpoint on the same topic is not ours.
    let mut other = vec![range(0, 0, 99)];
    let plan = plan_block("other_job", "t", 40, 1, &mut other);
    clickhouse.insert_native(&plan.table, plan.body).await.unwrap();

    let state = checkpoints::load(&clickhouse, "view_counts", "t").await.unwrap();
    assert_eq!(state.last_committed, Some(1));
    // Epochs of an older build (below 1 << 32) are generation 0; the next run is generation 1.
    assert_eq!((state.generation, state.next_epoch, state.base_epoch), (1, G, 3));
    assert_eq!(state.pending.keys().copied().collect::<Vec<_>>(), vec![2, 3]);
    assert_eq!(state.pending[&2], vec![range(1, 5, 8)]);
    assert_eq!(state.pending_peers, Some(2));
    assert_eq!(state.resume.get(&0), Some(&12));
    assert_eq!(state.resume.get(&1), Some(&8));

    // Generation 1 records what it built on and plans; then a plan of the dead generation 0
    // lands late (epoch 4, offsets generation 1 also planned): it does not count.
    let generation = checkpoints::generation_block("view_counts", "t", &state, 1_795_812_361, 0);
    clickhouse.insert_native(&generation.table, generation.body).await.unwrap();
    for (epoch, mut ranges) in [(G, vec![range(0, 12, 20)]), (4, vec![range(0, 12, 15)])] {
        let plan = plan_block("view_counts", "t", epoch, 2, &mut ranges);
        clickhouse.insert_native(&plan.table, plan.body).await.unwrap();
    }
    let state = checkpoints::load(&clickhouse, "view_counts", "t").await.unwrap();
    assert_eq!(state.void_plans, vec![(0, 3)]);
    assert_eq!(state.pending.keys().copied().collect::<Vec<_>>(), vec![2, 3, G]);
    assert_eq!(state.resume.get(&0), Some(&20));
    assert_eq!((state.generation, state.base_epoch), (2, G));

    // Pending ranges that overlap (two instances at once) are refused, not counted twice.
    let mut overlapping = vec![range(1, 6, 9)];
    let plan = plan_block("view_counts", "t", G + 1, 2, &mut overlapping);
    clickhouse.insert_native(&plan.table, plan.body).await.unwrap();
    let error = checkpoints::load(&clickhouse, "view_counts", "t").await.unwrap_err();
    assert!(error.to_string().contains("do not follow one another in partition"), "{error}");

    schema::drop_database(&clickhouse).await.unwrap();
}

const G: u64 = 1 << checkpoints::GENERATION_SHIFT;

/// A long-running job's checkpoint: 400,000 committed epochs of two partitions, a late plan of
/// a dead process among them, then a few pending epochs. With a snapshot, `load` reads only the
/// tail (it runs under `max_rows_to_read`, which the full scans of before exceed) and finds
/// exactly what it finds without one.
#[tokio::test]
#[ignore = "needs ClickHouse: make up, then make test"]
async fn a_snapshot_bounds_what_a_start_reads_and_changes_nothing() {
    let clickhouse = fresh_database("snapshot").await;
    let (job, topic) = ("view_counts", "t");
    // Generation 1 planned and committed epochs G+0 .. G+399_999, 10 offsets per partition each.
    let n: u64 = 400_000;
    clickhouse
        .execute(&format!(
            "INSERT INTO checkpoint_ranges SELECT '{job}', '{topic}', {G} + intDiv(number, 2), toUInt32(number % 2), \
             intDiv(number, 2) * 10, intDiv(number, 2) * 10 + 10, 1 FROM system.numbers LIMIT {}",
            2 * n
        ))
        .await
        .unwrap();
    clickhouse
        .execute(&format!(
            "INSERT INTO checkpoint_commits SELECT '{job}', '{topic}', {G} + number, 0 FROM system.numbers LIMIT {n}"
        ))
        .await
        .unwrap();
    let first = checkpoints::JobState { generation: 1, base_epoch: 0, ..Default::default() };
    let generation = checkpoints::generation_block(job, topic, &first, 0, 0);
    clickhouse.insert_native(&generation.table, generation.body).await.unwrap();
    // Generation 2 started on G+399_999; then a late plan of generation 1 landed (void), and
    // generation 2 planned two epochs that did not commit.
    let second = checkpoints::JobState { generation: 2, base_epoch: G + n - 1, ..Default::default() };
    let generation = checkpoints::generation_block(job, topic, &second, 0, 0);
    clickhouse.insert_native(&generation.table, generation.body).await.unwrap();
    let range = |partition, start, end| Range { partition, start, end };
    for (epoch, mut ranges) in [
        (G + n, vec![range(0, n * 10, n * 10 + 7)]),
        (2 * G, vec![range(0, n * 10, n * 10 + 3)]),
        (2 * G + 1, vec![range(0, n * 10 + 3, n * 10 + 5), range(1, n * 10, n * 10 + 1)]),
    ] {
        let plan = plan_block(job, topic, epoch, 1, &mut ranges);
        clickhouse.insert_native(&plan.table, plan.body).await.unwrap();
    }
    let full = checkpoints::load(&clickhouse, job, topic).await.unwrap();
    assert_eq!(full.last_committed, Some(G + n - 1));
    assert_eq!(full.pending.keys().copied().collect::<Vec<_>>(), vec![2 * G, 2 * G + 1]);
    assert_eq!((full.resume[&0], full.resume[&1]), (n * 10 + 5, n * 10 + 1));

    let capped = clickhouse.with_setting("max_rows_to_read", "100000");
    assert!(checkpoints::load(&capped, job, topic).await.is_err(), "without a snapshot a start reads everything");

    // The snapshot a run would write after committing G+399_990.
    let at = G + n - 10;
    let offsets = [(0, (n - 9) * 10), (1, (n - 9) * 10)].into_iter().collect();
    let snapshot = checkpoints::snapshot_block(job, topic, at, &offsets);
    clickhouse.insert_native(&snapshot.table, snapshot.body).await.unwrap();
    let bounded = checkpoints::load(&capped, job, topic).await.expect("a start reads only the tail");
    assert_eq!(bounded.last_committed, full.last_committed);
    assert_eq!(bounded.pending, full.pending);
    assert_eq!(bounded.resume, full.resume);
    assert_eq!(
        (bounded.generation, bounded.next_epoch, bounded.base_epoch),
        (full.generation, full.next_epoch, full.base_epoch)
    );
    assert_eq!(bounded.void_plans, full.void_plans, "the late plan lies after the snapshot");
    // A partition that has not moved since the snapshot resumes from it.
    let mut only_one = vec![range(0, n * 10 + 5, n * 10 + 6)];
    let plan = plan_block(job, topic, 2 * G + 2, 1, &mut only_one);
    clickhouse.insert_native(&plan.table, plan.body).await.unwrap();
    let commit = commit_block(job, topic, 2 * G + 2, 0);
    clickhouse.insert_native(&commit.table, commit.body).await.unwrap();
    let offsets = [(0, n * 10 + 6), (1, n * 10 + 1)].into_iter().collect();
    let snapshot = checkpoints::snapshot_block(job, topic, 2 * G + 2, &offsets);
    clickhouse.insert_native(&snapshot.table, snapshot.body).await.unwrap();
    let latest = checkpoints::load(&capped, job, topic).await.unwrap();
    assert_eq!(latest.last_committed, Some(2 * G + 2));
    assert!(latest.pending.is_empty());
    assert_eq!((latest.resume[&0], latest.resume[&1]), (n * 10 + 6, n * 10 + 1));
    // A snapshot whose epoch has no commit row (a re-run epoch whose range held no message
    // writes none, yet it finished): the snapshot itself says it committed (a review found a
    // start that then re-ran the whole history).
    let snapshot = checkpoints::snapshot_block(job, topic, 2 * G + 3, &offsets);
    clickhouse.insert_native(&snapshot.table, snapshot.body).await.unwrap();
    let latest = checkpoints::load(&capped, job, topic).await.unwrap();
    assert_eq!(latest.last_committed, Some(2 * G + 3));
    assert!(latest.pending.is_empty());
    assert_eq!((latest.resume[&0], latest.resume[&1]), (n * 10 + 6, n * 10 + 1));
    // Old snapshots, plans and commits are trimmed (mutations, applied in the background); the
    // start is unchanged.
    checkpoints::trim_checkpoint(&clickhouse, job, topic, 2 * G + 3).await.unwrap();
    let left = count_after_mutations(&clickhouse, "SELECT count() AS n FROM checkpoint_snapshots", 2).await;
    assert_eq!(left, 2, "only the newest snapshot's two partitions remain");
    let plans_before = format!("SELECT count() AS n FROM checkpoint_ranges WHERE epoch < {}", 2 * G + 3);
    let plans = count_after_mutations(&clickhouse, &plans_before, 0).await;
    assert_eq!(plans, 0, "the plans before the snapshot are gone");
    let trimmed = checkpoints::load(&capped, job, topic).await.unwrap();
    assert_eq!(trimmed, latest);
    schema::drop_database(&clickhouse).await.unwrap();
}

/// The count `sql` answers once it is `expected`, or after 10 s (mutations apply in the
/// background), whichever comes first.
async fn count_after_mutations(clickhouse: &ClickHouse, sql: &str, expected: u64) -> u64 {
    #[derive(clickhouse::Row, serde::Deserialize)]
    struct Count {
        n: u64,
    }
    let mut n = u64::MAX;
    for _ in 0..100 {
        let rows: Vec<Count> = clickhouse.fetch_all(clickhouse.client().query(sql)).await.unwrap();
        n = rows[0].n;
        if n == expected {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    n
}

/// A generation row recorded by an instance that had lost the lease (lower token than the
/// generation before it) voids nothing and none of its plans count: the standby's plans after
/// its base stay counted, and the stale instance's own plan is ignored.
#[tokio::test]
#[ignore = "needs ClickHouse: make up, then make test"]
async fn a_fenced_generation_changes_nothing() {
    let clickhouse = fresh_database("fenced").await;
    let (job, topic) = ("view_counts", "t");
    let range = |partition, start, end| Range { partition, start, end };
    let record = |generation, base_epoch, token| {
        let state = checkpoints::JobState { generation, base_epoch, ..Default::default() };
        checkpoints::generation_block(job, topic, &state, 0, token)
    };
    // The standby (token 6) ran generation 1: planned and committed G+0..G+2.
    let insert = record(1, 0, 6);
    clickhouse.insert_native(&insert.table, insert.body).await.unwrap();
    for (epoch, start) in [(G, 0), (G + 1, 10), (G + 2, 20)] {
        let plan = plan_block(job, topic, epoch, 1, &mut [range(0, start, start + 10)]);
        clickhouse.insert_native(&plan.table, plan.body).await.unwrap();
        let commit = commit_block(job, topic, epoch, 0);
        clickhouse.insert_native(&commit.table, commit.body).await.unwrap();
    }
    // The paused instance (token 5) had read the checkpoint when generation 1 had planned G+0:
    // its row (base G) and one plan land late.
    let insert = record(2, G, 5);
    clickhouse.insert_native(&insert.table, insert.body).await.unwrap();
    let plan = plan_block(job, topic, 2 * G, 1, &mut [range(0, 10, 15)]);
    clickhouse.insert_native(&plan.table, plan.body).await.unwrap();

    let state = checkpoints::load(&clickhouse, job, topic).await.unwrap();
    assert_eq!(state.last_committed, Some(G + 2));
    assert!(state.pending.is_empty(), "the stale plan is not pending: {:?}", state.pending);
    assert_eq!(state.resume[&0], 30, "generation 1's plans after the stale base still count");
    assert_eq!(state.newest_lease_token, 6);
    assert_eq!(state.generation, 3);
    assert_eq!(state.base_epoch, G + 2, "the fenced generation's plan is not what this run builds on");
    schema::drop_database(&clickhouse).await.unwrap();
}

#[tokio::test]
#[ignore = "needs ClickHouse: make up, then make test"]
async fn old_changelog_ranges_are_dropped_whole_and_recent_ones_stay() {
    let clickhouse = fresh_database("changelog").await;
    let span = crate::checkpoints::CHANGELOG_PARTITION_EPOCHS;
    let newest = 10 * 86_400;
    // The second range holds a minute an hour before the newest: the trending windows need it.
    for (range, minute) in [(0u64, 60), (1, newest - 3600), (2, 120), (3, newest)] {
        let epoch = range * span + 5;
        let marker = crate::rows::count_blocks_row(epoch, 0, 1);
        clickhouse.insert_native(&marker.table, marker.body).await.unwrap();
        clickhouse
            .execute(&format!(
                "INSERT INTO count_changes (video_id, event_type, minute, count, epoch) VALUES ('v', 'view', {minute}, 1, {epoch})"
            ))
            .await
            .unwrap();
    }
    // Lists: 1h views at epochs in top partitions 0 and 3, 1h likes last written in partition 2.
    let top = crate::checkpoints::TOP_PARTITION_EPOCHS;
    for (kind, epoch) in [("view", 5), ("view", 3 * top + 5), ("like", 2 * top + 5)] {
        let mut rows = vec![crate::rows::TopRow {
            event_type: kind.into(),
            window: "1h".into(),
            from_ms: 0,
            to_ms: 3_600_000,
            rank: 1,
            video_id: "v".into(),
            count: 1,
        }];
        let insert = crate::rows::top_videos_block(epoch, &mut rows);
        clickhouse.insert_native(&insert.table, insert.body).await.unwrap();
    }
    let epochs = |table: &'static str| {
        let clickhouse = clickhouse.clone();
        async move {
            let sql = format!("SELECT epoch FROM {table} ORDER BY epoch");
            clickhouse.fetch_all::<u64>(clickhouse.client().query(&sql)).await.unwrap()
        }
    };
    // Below an epoch of the fourth range: the third stays with it, the second for its minute,
    // the first goes; of the lists, those before every list's newest epoch go.
    let dropped = crate::checkpoints::drop_old_changelog(&clickhouse, 3 * span + 10).await.unwrap();
    assert_eq!(dropped, 3, "one range of two tables, one partition of lists");
    for table in ["count_changes", "count_blocks"] {
        assert_eq!(epochs(table).await, vec![span + 5, 2 * span + 5, 3 * span + 5], "{table}");
    }
    assert_eq!(epochs("top_videos").await, vec![2 * top + 5, 3 * top + 5]);
    assert_eq!(crate::checkpoints::drop_old_changelog(&clickhouse, 3 * span + 10).await.unwrap(), 0);
    clickhouse.execute(&format!("DROP DATABASE {}", clickhouse.database())).await.unwrap();
}

/// A handle bounded to one request at a time runs them one after the other (the clones share
/// the turns); an unbounded handle beside it does not wait for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs ClickHouse: make up, then make test"]
async fn requests_of_a_bounded_handle_take_turns() {
    let unbounded = ClickHouse::new(ClickHouseConfig { database: "default".into(), ..ClickHouseConfig::default() });
    let bounded = unbounded.with_concurrency(1);
    let sleep = |clickhouse: ClickHouse| async move {
        let query = clickhouse.client().query("SELECT sleep(0.5) AS slept");
        clickhouse.fetch_all::<u8>(query).await.expect("answered")
    };
    let started = std::time::Instant::now();
    let (a, b) = tokio::join!(sleep(bounded.clone()), sleep(bounded.clone()));
    assert_eq!((a.len(), b.len()), (1, 1));
    assert!(started.elapsed() >= std::time::Duration::from_millis(950), "one after the other: {:?}", started.elapsed());

    // While the bounded handle is busy, the unbounded one answers without waiting its turn.
    let busy = tokio::spawn(sleep(bounded.clone()));
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let timed = |clickhouse: ClickHouse| async move {
        let started = std::time::Instant::now();
        sleep(clickhouse).await;
        started.elapsed()
    };
    let (waited, direct) = tokio::join!(timed(bounded.clone()), timed(unbounded.clone()));
    busy.await.unwrap();
    assert!(waited > direct, "the bounded request waited its turn ({waited:?}), the other did not ({direct:?})");
}
