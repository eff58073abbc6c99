//! Timely's cluster options: one job as two processes (one worker each) counts exactly what
//! one process would.

use rand::Rng;
use videocount_e2e::TestEnv;
use videocount_loadgen::{Amount, Spec, produce};

#[test]
#[ignore = "needs Kafka and ClickHouse: make up, then make test"]
fn two_processes_count_exactly() {
    let env = TestEnv::new("cluster", 4);
    let spec = Spec { videos: 300, seed: 9, ..Spec::default() };
    let mut expected = produce(videocount_e2e::BROKERS, &env.topic, spec.clone(), Amount::Count(100_000)).unwrap();

    let run_cluster = || {
        // Fresh ports each run: the previous run's connections may still hold its ports.
        let base: u16 = rand::rng().random_range(20_000..40_000);
        let hostfile = std::env::temp_dir().join(format!("{}-hosts-{base}.txt", env.topic));
        std::fs::write(&hostfile, format!("127.0.0.1:{}\n127.0.0.1:{}\n", base, base + 1)).unwrap();
        let hostfile = hostfile.to_str().unwrap().to_owned();
        // Process 1 starts a second and a half after process 0, as on two machines.
        let processes: Vec<_> = (0..2)
            .map(|p| {
                if p == 1 {
                    videocount_e2e::sleep_ms(1500);
                }
                env.job(&["--until-caught-up", "-w", "1", "-n", "2", "-p", &p.to_string(), "--hostfile", &hostfile])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let outputs: Vec<_> = processes.into_iter().map(|p| p.wait_with_output().unwrap()).collect();
        for (p, output) in outputs.iter().enumerate() {
            assert!(
                output.status.success(),
                "process {p} failed: {}\n---- the other process: {}",
                String::from_utf8_lossy(&output.stderr),
                String::from_utf8_lossy(&outputs[1 - p].stderr)
            );
        }
    };
    run_cluster();
    env.assert_exact(&expected);

    // A second run resumes where the first left off: both processes must have planned under
    // one generation, or the second would set one process's plans aside and count its
    // partitions again.
    expected
        .merge(produce(videocount_e2e::BROKERS, &env.topic, Spec { seed: 10, ..spec }, Amount::Count(20_000)).unwrap());
    run_cluster();
    env.assert_exact(&expected);
    env.drop();
}
