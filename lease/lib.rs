//! One active instance per job: a lease in ZooKeeper, and the [`Fence`] every write checks.
//!
//! A job instance takes the lease before it reads its checkpoint and holds it for as long as it
//! runs; a second instance (a standby) queues behind it and takes over when the first one's
//! ZooKeeper session ends (a clean exit at once, a `kill -9` or a cut-off after the session
//! timeout). The lease is ZooKeeper's lock recipe (an ephemeral sequential node per contender,
//! the lowest holds it), as `zookeeper-client` implements it.
//!
//! **The fence.** Holding the node is not enough: a holder paused longer than its session (a
//! `SIGSTOP`, a frozen VM, a long swap) resumes believing it still holds the lease while a
//! standby has taken over. So the holder confirms the lease every [`LeaseConfig::confirm_every`]
//! (a `sync` and a read of its own node, answered by the ensemble's leader state), and each write
//! asks [`Fence::check`] first: a write is allowed only within two thirds of a session timeout
//! of the *sending* of the last confirmation that succeeded. ZooKeeper expires a session no
//! earlier than one session timeout after it last heard from the client, and the standby takes
//! the lease only after that, so a write that passed the check was sent while no other instance
//! could hold the lease (this relies on the two machines' clocks running at about the same rate,
//! not on them agreeing). A lease that lapses without being lost (ZooKeeper slow or away for a
//! moment) makes writes wait; a lease that is lost (the session expired, the node is gone) stops
//! the job. What a check cannot cover (a write that passed it and is then delayed for long, in
//! the process or the network) is the checkpoint's business: docs/exactly-once.md.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Now on the clock that keeps running while the machine is suspended (CLOCK_BOOTTIME):
/// `Instant` stops then, and a machine resumed after a suspend longer than the session would
/// still believe its lease valid.
fn boot_now() -> Duration {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    Duration::new(now.tv_sec.max(0) as u64, now.tv_nsec.clamp(0, 999_999_999) as u32)
}

use tracing::{info, warn};
use zookeeper_client as zk;

/// Where the lease lives and how long a session lasts.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// ZooKeeper connect string: `host:port[,host:port...][/chroot]`.
    pub zookeeper: String,
    /// The lease's directory, e.g. `/videocount/<database>/<job>/process-0`.
    pub path: String,
    /// The session timeout asked of ZooKeeper (the server clamps it to its own bounds).
    pub session_timeout: Duration,
}

impl LeaseConfig {
    /// How often the holder confirms its lease: a sixth of the session, so that a lease stays
    /// valid across a few slow or failed confirmations.
    pub fn confirm_every(session_timeout: Duration) -> Duration {
        session_timeout / 6
    }
}

/// The lease flags of the jobs and of `videocount replay`; each can also be set from the
/// environment.
#[derive(clap::Args, Debug, Clone)]
pub struct LeaseArgs {
    /// ZooKeeper ensemble holding the jobs' leases (`host:port,host:port`); the same one as
    /// ClickHouse's replicated tables use is fine.
    #[arg(long, env = "VIDEOCOUNT_ZOOKEEPER", default_value = "127.0.0.1:2181")]
    pub zookeeper: String,
    /// ZooKeeper session timeout of the lease, in milliseconds: a standby takes over this long
    /// after the active instance died or was cut off (ZooKeeper clamps it to 2-20 ticks).
    #[arg(long, env = "VIDEOCOUNT_LEASE_SESSION_MS", default_value_t = 6000,
          value_parser = clap::value_parser!(u64).range(1000..=600_000))]
    pub lease_session_ms: u64,
    /// The leases' root in ZooKeeper; a job's lease is `<root>/<database>/<job>/process-<i>`.
    #[arg(long, env = "VIDEOCOUNT_LEASE_ROOT", default_value = "/videocount/leases")]
    pub lease_root: String,
}

impl LeaseArgs {
    /// The lease of process `process` of job `job` on `database`.
    pub fn config(&self, database: &str, job: &str, process: usize) -> LeaseConfig {
        LeaseConfig {
            zookeeper: self.zookeeper.clone(),
            path: format!("{}/{database}/{job}/process-{process}", self.lease_root.trim_end_matches('/')),
            session_timeout: Duration::from_millis(self.lease_session_ms),
        }
    }
}

/// Describes this process to the instances that wait behind it: what it is, its host and pid,
/// and what identifies the process on this machine (boot id, pid namespace, start time), so
/// that an instance restarted on the same machine can tell that the holder died.
pub fn describe_me(what: &str) -> String {
    let me = Process::me();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_owned()).unwrap_or_default();
    format!(
        "{} host={host} pid={} uid={} boot={} pidns={} start={}",
        what.replace(char::is_whitespace, "_"),
        me.pid,
        me.uid,
        me.boot,
        me.pidns,
        me.start
    )
}

/// A process as this machine's kernel knows it: unique across machines and boots.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Process {
    boot: String,
    pidns: String,
    pid: u32,
    uid: u32,
    start: String,
}

impl Process {
    fn me() -> Process {
        Process::try_me().unwrap_or(Process {
            boot: String::new(),
            pidns: String::new(),
            pid: std::process::id(),
            uid: u32::MAX,
            start: String::new(),
        })
    }

    fn try_me() -> Option<Process> {
        let pid = std::process::id();
        Some(Process {
            boot: read_trimmed("/proc/sys/kernel/random/boot_id"),
            pidns: std::fs::read_link("/proc/self/ns/pid").map(|l| l.display().to_string()).unwrap_or_default(),
            pid,
            uid: std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").ok()?),
            start: start_time(pid).ok().unwrap_or_default(),
        })
    }

    /// Parses what [`describe_me`] wrote.
    fn parse(description: &str) -> Option<Process> {
        let field = |key: &str| {
            description.split(' ').find_map(|token| token.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        };
        Some(Process {
            boot: field("boot")?.to_owned(),
            pidns: field("pidns")?.to_owned(),
            pid: field("pid")?.parse().ok()?,
            uid: field("uid")?.parse().ok()?,
            start: field("start")?.to_owned(),
        })
    }

    /// Whether this process is known to be dead: it ran on this machine in this boot and pid
    /// namespace under this user, and its pid either does not exist (the kernel says so) or
    /// belongs to a process started at another time. Anything else (another machine, a
    /// container of its own, another user, a /proc that cannot be read) is not known to be dead.
    fn is_dead_here(&self) -> bool {
        let me = Process::me();
        if self.boot.is_empty()
            || self.pidns.is_empty()
            || self.boot != me.boot
            || self.pidns != me.pidns
            || self.uid != me.uid
        {
            return false;
        }
        match start_time(self.pid) {
            Ok(start) => start != self.start,
            Err(e) => e.kind() == std::io::ErrorKind::NotFound,
        }
    }
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path).map(|s| s.trim().to_owned()).unwrap_or_default()
}

/// A process's start time in clock ticks since boot (field 22 of /proc/PID/stat); `NotFound`
/// only when no such process exists.
fn start_time(pid: u32) -> std::io::Result<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let unreadable = || std::io::Error::other(format!("/proc/{pid}/stat has no start time"));
    let after = &stat[stat.rfind(')').ok_or_else(unreadable)? + 1..];
    after.split_whitespace().nth(19).map(str::to_owned).ok_or_else(unreadable)
}

/// Deletes the lease nodes of contenders that died on this machine (a `kill -9`, a crash):
/// their sessions would hold the lease for a session timeout, though nothing can write for
/// them any more. A restart on the same machine thus takes over at once.
async fn remove_dead_contenders(client: &zk::Client, dir: &str) {
    let Ok(children) = client.list_children(dir).await else { return };
    for child in children {
        let node = format!("{dir}/{child}");
        let Ok((data, stat)) = client.get_data(&node).await else { continue };
        let description = String::from_utf8_lossy(&data);
        if Process::parse(&description).is_some_and(|p| p.is_dead_here())
            && client.delete(&node, Some(stat.version)).await.is_ok()
        {
            info!(lease = %node, holder = %description, "removed the lease of an instance that died on this machine");
        }
    }
}

/// Why the lease cannot be taken or is gone.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("ZooKeeper at {0}: {1}")]
    ZooKeeper(String, zk::Error),
    #[error("{0}")]
    Lost(String),
    #[error("the lease {path} is held by {holder}")]
    Held { path: String, holder: String },
}

/// Whether writes may go out now; shared by every writer of a job (cheap to clone).
#[derive(Clone, Debug)]
pub struct Fence {
    state: Arc<Mutex<FenceState>>,
}

#[derive(Debug)]
struct FenceState {
    /// Writes sent before this moment ([`boot_now`]) were sent while the lease was held.
    valid_until: Option<Duration>,
    /// Set once the lease is lost for good.
    lost: Option<String>,
}

/// What [`Fence::check`] says about a write that is about to be sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Permit {
    /// Send it.
    Granted,
    /// Not confirmed recently: wait and ask again (the lease may be confirmed or lost).
    Wait,
    /// The lease is gone: never send it; the job must stop.
    Lost(String),
}

impl Fence {
    /// A fence that always grants: for tools that run without a lease and for unit tests.
    pub fn open() -> Fence {
        Fence { state: Arc::new(Mutex::new(FenceState { valid_until: None, lost: None })) }
    }

    /// A fence that makes writes wait until [`acquire`] takes the lease for it.
    pub fn unheld() -> Fence {
        Fence::held(boot_now())
    }

    fn held(valid_until: Duration) -> Fence {
        Fence { state: Arc::new(Mutex::new(FenceState { valid_until: Some(valid_until), lost: None })) }
    }

    /// Asks whether a write may be sent now (see the module documentation).
    pub fn check(&self) -> Permit {
        let Ok(state) = self.state.lock() else { return Permit::Lost("the fence's lock is poisoned".into()) };
        if let Some(reason) = &state.lost {
            return Permit::Lost(reason.clone());
        }
        match state.valid_until {
            None => Permit::Granted,
            Some(until) if boot_now() < until => Permit::Granted,
            Some(_) => Permit::Wait,
        }
    }

    /// The reason the lease was lost, if it was.
    pub fn lost(&self) -> Option<String> {
        self.state.lock().ok().and_then(|s| s.lost.clone())
    }

    /// Waits until a write may be sent; `Err` with the reason once the lease is lost.
    pub async fn wait(&self) -> Result<(), String> {
        loop {
            match self.check() {
                Permit::Granted => return Ok(()),
                Permit::Lost(reason) => return Err(reason),
                Permit::Wait => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    fn extend(&self, until: Duration) {
        if let Ok(mut state) = self.state.lock()
            && state.lost.is_none()
        {
            state.valid_until = Some(state.valid_until.map_or(until, |u| u.max(until)));
        }
    }

    /// Marks the lease lost, as the keeper does when its session ends (for tests of writers).
    pub fn lose_for_test(&self, reason: &str) {
        self.lose(reason.to_owned());
    }

    fn lose(&self, reason: String) {
        if let Ok(mut state) = self.state.lock() {
            state.lost.get_or_insert(reason);
        }
    }
}

/// A lease held: its fence, and the task that keeps confirming it. Dropping it lets the lease go
/// (the node is deleted; a standby takes over at once).
#[derive(Debug)]
pub struct Lease {
    fence: Fence,
    node: String,
    token: u64,
    keeper: tokio::task::JoinHandle<()>,
    lock: Option<zk::OwnedLockClient>,
    /// The runtime the client runs on: dropping the lock spawns its deletion there, also when
    /// the lease is dropped outside the runtime (a start that stops with an error).
    runtime: tokio::runtime::Handle,
}

impl Lease {
    pub fn fence(&self) -> Fence {
        self.fence.clone()
    }

    /// The lease's fencing token: the ZooKeeper transaction id that created its node (`czxid`).
    /// Transaction ids only grow over an ensemble's life (whatever the lease's path), so a later
    /// holder always has a larger token than an earlier one; only a new ensemble starts again.
    pub fn token(&self) -> u64 {
        self.token
    }

    /// Lets the lease go now and waits (up to `timeout`) until ZooKeeper has deleted the node, so
    /// that a standby can take over at once.
    pub async fn release(mut self, timeout: Duration) {
        self.keeper.abort();
        // Nothing may be sent once the node is gone (a standby takes over at once).
        self.fence.lose(format!("the lease {} was let go", self.node));
        if let Some(lock) = self.lock.take() {
            let client = lock.client().clone();
            let node = lock.lock_path().to_owned();
            std::mem::forget(lock);
            let _ = tokio::time::timeout(timeout, client.delete(&node, None)).await;
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.keeper.abort();
        self.fence.lose(format!("the lease {} was let go", self.node));
        let _inside = self.runtime.enter();
        drop(self.lock.take());
    }
}

async fn connect(config: &LeaseConfig) -> Result<zk::Client, LeaseError> {
    zk::Client::connector()
        .with_session_timeout(config.session_timeout)
        .connect(&config.zookeeper)
        .await
        .map_err(|e| LeaseError::ZooKeeper(config.zookeeper.clone(), e))
}

/// Who holds the lease now (the data of the lowest contender), for the waiting instance's log.
async fn holder(client: &zk::Client, dir: &str) -> Option<String> {
    let mut children = client.list_children(dir).await.ok()?;
    children.sort_by_key(|name| name.rsplit('-').next().map(str::to_owned));
    let first = children.first()?;
    let (data, _) = client.get_data(&format!("{dir}/{first}")).await.ok()?;
    Some(String::from_utf8_lossy(&data).into_owned())
}

/// Takes the lease, waiting behind its holder for as long as it takes (logging who that is every
/// 30 s), and opens `fence` (made with [`Fence::unheld`]) for as long as it is held; `me`
/// describes this instance to the others (host, pid, start time).
pub async fn acquire(config: &LeaseConfig, me: &str, fence: &Fence) -> Result<Lease, LeaseError> {
    let client = connect(config).await?;
    let ancestors = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
    let options = zk::LockOptions::new(zk::Acls::anyone_all())
        .with_ancestor_options(ancestors)
        .map_err(|e| LeaseError::ZooKeeper(config.zookeeper.clone(), e))?;
    let prefix = zk::LockPrefix::new_curator(&config.path, "lease-")
        .map_err(|e| LeaseError::ZooKeeper(config.zookeeper.clone(), e))?;
    let waited = Instant::now();
    let lock = {
        let locking = client.lock(prefix, me.as_bytes(), options);
        tokio::pin!(locking);
        let mut look = tokio::time::interval(Duration::from_millis(500));
        let mut next_report = Instant::now() + Duration::from_secs(1);
        loop {
            tokio::select! {
                lock = &mut locking => break lock.map_err(|e| LeaseError::ZooKeeper(config.zookeeper.clone(), e))?.into_owned(),
                _ = look.tick() => {
                    remove_dead_contenders(&client, &config.path).await;
                    if Instant::now() >= next_report {
                        next_report = Instant::now() + Duration::from_secs(30);
                        let holder = holder(&client, &config.path).await.unwrap_or_else(|| "unknown".into());
                        info!(lease = %config.path, %holder, waited_secs = waited.elapsed().as_secs(), "standby: waiting for the lease");
                    }
                }
            }
        }
    };
    // Confirm once before anything is written: the lock recipe's answer is as old as its watch.
    let session = client.session_timeout();
    let sent = boot_now();
    let token = confirm(&client, lock.lock_path())
        .await
        .map_err(|(Unconfirmed::Lost(e) | Unconfirmed::Transient(e))| LeaseError::Lost(e))?;
    fence.extend(sent + session * 2 / 3);
    let fence = fence.clone();
    let node = lock.lock_path().to_owned();
    info!(lease = %node, session_ms = session.as_millis() as u64, waited_secs = waited.elapsed().as_secs_f64(), "took the lease");
    let keeper = tokio::spawn(keep(client, node.clone(), fence.clone(), session));
    Ok(Lease { fence, node, token, keeper, lock: Some(lock), runtime: tokio::runtime::Handle::current() })
}

/// Why a confirmation failed: for good, or maybe only for now.
enum Unconfirmed {
    Lost(String),
    Transient(String),
}

/// As [`acquire`], but gives up after `wait` when another instance holds the lease, saying who.
pub async fn acquire_within(
    config: &LeaseConfig,
    me: &str,
    fence: &Fence,
    wait: Duration,
) -> Result<Lease, LeaseError> {
    match tokio::time::timeout(wait, acquire(config, me, fence)).await {
        Ok(lease) => lease,
        Err(_) => {
            let client = connect(config).await?;
            let holder = holder(&client, &config.path).await.unwrap_or_else(|| "another instance".into());
            Err(LeaseError::Held { path: config.path.clone(), holder })
        }
    }
}

/// One confirmation: the node still exists and belongs to this session, as of a `sync` (which
/// brings the server this session talks to up to date with the ensemble).
async fn confirm(client: &zk::Client, node: &str) -> Result<u64, Unconfirmed> {
    let failed = |e: zk::Error| match e {
        zk::Error::SessionExpired | zk::Error::ClientClosed | zk::Error::AuthFailed => {
            Unconfirmed::Lost(format!("the ZooKeeper session ended: {e}"))
        }
        e => Unconfirmed::Transient(format!("confirming the lease {node}: {e}")),
    };
    client.sync(node).await.map_err(failed)?;
    match client.check_stat(node).await.map_err(failed)? {
        Some(stat) if stat.ephemeral_owner == client.session_id().0 => Ok(stat.czxid.max(0) as u64),
        Some(_) => Err(Unconfirmed::Lost(format!("the lease node {node} belongs to another session"))),
        None => Err(Unconfirmed::Lost(format!("the lease node {node} is gone"))),
    }
}

/// Confirms the lease every sixth of a session until it is lost.
async fn keep(client: zk::Client, node: String, fence: Fence, session: Duration) {
    let every = LeaseConfig::confirm_every(session);
    let mut failing_since: Option<Duration> = None;
    loop {
        tokio::time::sleep(every).await;
        let sent = boot_now();
        match tokio::time::timeout(session, confirm(&client, &node)).await {
            Ok(Ok(_)) => {
                fence.extend(sent + session * 2 / 3);
                if let Some(since) = failing_since.take() {
                    info!(lease = %node, after_secs = (boot_now() - since).as_secs_f64(), "lease confirmed again");
                }
            }
            Ok(Err(Unconfirmed::Lost(e))) => {
                let reason = format!(
                    "lost the lease {node} ({e}): this instance was paused or cut off from ZooKeeper for longer than \
                     its {} ms session, and another instance may have taken over; nothing more is written",
                    session.as_millis()
                );
                warn!("{reason}");
                fence.lose(reason);
                return;
            }
            Ok(Err(Unconfirmed::Transient(e))) => {
                failing_since.get_or_insert(sent);
                warn!(lease = %node, error = %e, "could not confirm the lease; writes wait until it is");
            }
            Err(_) => {
                failing_since.get_or_insert(sent);
                warn!(lease = %node, "confirming the lease timed out; writes wait until it is confirmed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_dead_pid_or_another_machine_is_told_apart() {
        let me = Process::parse(&describe_me("view_counts test")).expect("parses its own description");
        assert_eq!(me, Process::me());
        assert!(!me.is_dead_here(), "this process runs");
        let restarted = Process { start: "1".into(), ..me.clone() };
        assert!(restarted.is_dead_here(), "same pid, other start time: the holder died and the pid was reused");
        let elsewhere = Process { boot: "another-machine".into(), start: "1".into(), ..me.clone() };
        assert!(!elsewhere.is_dead_here(), "another machine's process is never judged from here");
        let container = Process { pidns: "pid:[1]".into(), start: "1".into(), ..me.clone() };
        assert!(!container.is_dead_here(), "another pid namespace is never judged from here");
        let other_user = Process { uid: me.uid.wrapping_add(1), start: "1".into(), ..me.clone() };
        assert!(!other_user.is_dead_here(), "another user's process is never judged from here");
        let gone = Process { pid: u32::MAX - 1, ..me };
        assert!(gone.is_dead_here(), "a pid that does not exist is dead");
        assert!(Process::parse("an old description without ids").is_none());
    }

    #[test]
    fn an_open_fence_grants() {
        assert_eq!(Fence::open().check(), Permit::Granted);
    }

    #[test]
    fn a_lapsed_lease_waits_and_a_lost_one_never_grants_again() {
        let fence = Fence::held(boot_now() + Duration::from_secs(60));
        assert_eq!(fence.check(), Permit::Granted);
        let lapsed = Fence::held(boot_now() - Duration::from_millis(1));
        assert_eq!(lapsed.check(), Permit::Wait);
        lapsed.extend(boot_now() + Duration::from_secs(60));
        assert_eq!(lapsed.check(), Permit::Granted);
        lapsed.lose("session expired".into());
        lapsed.extend(boot_now() + Duration::from_secs(600));
        assert_eq!(lapsed.check(), Permit::Lost("session expired".into()));
    }

    #[test]
    fn a_confirmation_never_shortens_the_lease() {
        let fence = Fence::held(boot_now() + Duration::from_secs(60));
        fence.extend(boot_now());
        assert_eq!(fence.check(), Permit::Granted);
    }
}
