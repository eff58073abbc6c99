//! The shared services themselves (Kafka, ClickHouse), stopped and restarted by outage tests.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::sleep_ms;

/// A shared service (ClickHouse, Kafka) that a test stops and starts again as it ran: its pid,
/// command line and working directory are taken from the running process, so the restart uses
/// the same data whichever checkout's `make up` started it.
pub struct Server {
    pub pid: String,
    command: Vec<String>,
    cwd: std::path::PathBuf,
    /// Where `make down` looks for the pid.
    pid_file: std::path::PathBuf,
    name: &'static str,
}

impl Server {
    /// `make up`'s server, never a node of the replicated stack (`make up-ha`, under var/ha/),
    /// which runs beside it during `make test`.
    fn find(name: &'static str, pattern: &str, pid_file: impl Fn(&[String]) -> std::path::PathBuf) -> Server {
        Server::find_where(name, pattern, |command| !command.iter().any(|a| a.contains("/var/ha/")), pid_file)
    }

    fn find_where(
        name: &'static str,
        pattern: &str,
        keep: impl Fn(&[String]) -> bool,
        pid_file: impl Fn(&[String]) -> std::path::PathBuf,
    ) -> Server {
        let output = Command::new("pgrep").args(["-f", pattern]).output().unwrap();
        let (pid, command) = String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|pid| {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
                let command: Vec<String> = cmdline
                    .split(|b| *b == 0)
                    .filter(|a| !a.is_empty())
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect();
                keep(&command).then(|| (pid.to_owned(), command))
            })
            .next()
            .unwrap_or_else(|| panic!("no running {name} of make up"));
        let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap();
        let pid_file = pid_file(&command);
        Server { pid, command, cwd, pid_file, name }
    }

    pub fn clickhouse() -> Server {
        Server::find("clickhouse", "clickhouse-server --config-file=", Server::pid_beside_config)
    }

    /// ClickHouse replica `n` of the replicated stack (`make up-ha`: var/ha/clickhouse-<n>/).
    pub fn ha_clickhouse(n: u32) -> Server {
        let config = format!("/var/ha/clickhouse-{n}/config.xml");
        Server::find_where(
            "clickhouse-replica",
            "clickhouse-server --config-file=",
            |command| command.iter().any(|a| a.ends_with(&config)),
            Server::pid_beside_config,
        )
    }

    /// A ClickHouse's pid file: `pid` beside its `--config-file` (services/up.sh, up-ha.sh).
    fn pid_beside_config(command: &[String]) -> std::path::PathBuf {
        Server::config_file(command).with_file_name("pid")
    }

    fn config_file(command: &[String]) -> std::path::PathBuf {
        let config = command.iter().find_map(|a| a.strip_prefix("--config-file=")).unwrap();
        std::path::PathBuf::from(config)
    }

    /// A ClickHouse server's data directory (`<path>` of its config: the node's `data/`).
    pub fn data_path(&self) -> std::path::PathBuf {
        let config = std::fs::read_to_string(Server::config_file(&self.command)).unwrap();
        let path = config.split("<path>").nth(1).and_then(|rest| rest.split("</path>").next()).unwrap();
        std::path::PathBuf::from(path)
    }

    /// The broker: `java ... kafka.Kafka .../server.properties`.
    pub fn kafka() -> Server {
        Server::find("kafka", "kafka\\.Kafka ", |command| {
            std::path::PathBuf::from(command.last().unwrap()).with_file_name("pid")
        })
    }

    /// SIGTERM, as an operator would stop it, and waits until the process is gone.
    pub fn stop(&self) {
        self.signal("-TERM");
    }

    /// SIGKILL, as a crash would end it, and waits until the process is gone.
    pub fn kill(&self) {
        self.signal("-KILL");
    }

    fn signal(&self, signal: &str) {
        assert!(Command::new("kill").args([signal, &self.pid]).status().unwrap().success());
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while std::path::Path::new(&format!("/proc/{}", self.pid)).exists() {
            assert!(std::time::Instant::now() < deadline, "{} did not stop", self.name);
            sleep_ms(200);
        }
    }

    /// Starts the server again as it ran. It outlives the test on purpose: it is the shared
    /// service, not a test fixture.
    #[allow(clippy::zombie_processes)]
    pub fn restart(&self) {
        let log_path = std::env::temp_dir().join(format!("videocount-test-{}.log", self.name));
        let log = std::fs::File::create(log_path).unwrap();
        let child = Command::new(&self.command[0])
            .args(&self.command[1..])
            .current_dir(&self.cwd)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        std::fs::write(&self.pid_file, child.id().to_string()).unwrap();
    }
}
