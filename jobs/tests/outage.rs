//! ClickHouse stopped under a running job: the job waits and retries, loses nothing, and
//! catches up once the server is back.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{TestEnv, sleep_ms};
use videocount_loadgen::{Amount, Spec, produce};

/// The ClickHouse server our tests talk to: its pid, command line and working directory.
/// Taken from the running process, so the restart uses the same data whichever checkout's
/// `make up` started it.
struct Server {
    pid: String,
    command: Vec<String>,
    cwd: PathBuf,
}

fn find_server() -> Server {
    let output = Command::new("pgrep").args(["-f", "clickhouse-server --config-file="]).output().unwrap();
    let pid = String::from_utf8_lossy(&output.stdout).lines().next().expect("a running clickhouse-server").to_owned();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let command =
        cmdline.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap();
    Server { pid, command, cwd }
}

/// Starts the server again as it ran, and records its pid where `make down` looks for it.
/// The server outlives the test on purpose: it is the shared service, not a test fixture.
#[allow(clippy::zombie_processes)]
fn restart(server: &Server) {
    let log = std::fs::File::create(std::env::temp_dir().join("videocount-outage-clickhouse.log")).unwrap();
    let child = Command::new(&server.command[0])
        .args(&server.command[1..])
        .current_dir(&server.cwd)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let config = server.command.iter().find_map(|a| a.strip_prefix("--config-file=")).unwrap();
    let pid_file = PathBuf::from(config).with_file_name("pid");
    std::fs::write(pid_file, child.id().to_string()).unwrap();
}

fn clickhouse_up() -> bool {
    Command::new("curl")
        .args(["-fsS", "--max-time", "1", "http://127.0.0.1:8123/ping"])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn a_clickhouse_outage_delays_counts_but_loses_none() {
    let env = TestEnv::new("outage", 2);
    let spec = Spec { videos: 200, seed: 21, ..Spec::default() };
    let mut expected = produce(common::BROKERS, &env.topic, spec.clone(), Amount::Count(100_000)).unwrap();
    let mut job = env.spawn(&["--workers", "2", "--epoch-ms", "200"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while env.scalar("SELECT count() FROM events_raw") < expected.events {
        assert!(Instant::now() < deadline, "job did not count the first events");
        sleep_ms(200);
    }

    // Stop the server the way an operator would (SIGTERM) and wait until it is gone.
    let server = find_server();
    assert!(Command::new("kill").arg(&server.pid).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(120);
    while PathBuf::from(format!("/proc/{}", server.pid)).exists() {
        assert!(Instant::now() < deadline, "ClickHouse did not stop");
        sleep_ms(200);
    }
    assert!(!clickhouse_up());
    expected.merge(produce(common::BROKERS, &env.topic, Spec { seed: 22, ..spec }, Amount::Count(50_000)).unwrap());
    sleep_ms(3000);
    assert!(job.0.try_wait().unwrap().is_none(), "the job must wait for ClickHouse, not exit");

    restart(&server);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !clickhouse_up() {
        assert!(Instant::now() < deadline, "ClickHouse did not come back");
        sleep_ms(200);
    }
    let deadline = Instant::now() + Duration::from_secs(180);
    while env.scalar("SELECT count() FROM events_raw") < expected.events {
        assert!(Instant::now() < deadline, "job did not catch up after the outage");
        assert!(job.0.try_wait().unwrap().is_none(), "job exited during the outage");
        sleep_ms(500);
    }
    assert!(Command::new("kill").args(["-TERM", &job.0.id().to_string()]).status().unwrap().success());
    assert!(job.0.wait().unwrap().success());
    env.assert_exact(&expected);
    env.drop();
}
