//! The slow stream's spill file: batches that wait for a stalled sketch thread on disk (an
//! embedded redb database) instead of in memory.

use std::path::{Path, PathBuf};

use redb::{Database, Durability, TableDefinition};

use crate::stats_epoch::LocatedInput;

/// A spill file that failed: the slow stream stops with it rather than lose an epoch. The
/// message includes the cause, which is therefore not also a `source` (it would be printed
/// twice in a chain).
#[derive(Debug, thiserror::Error)]
pub enum SpillError {
    #[error("creating the spill file {path}: {error}")]
    Create { path: PathBuf, error: redb::Error },
    #[error("spill file: {0}")]
    Store(redb::Error),
    #[error("spill file: encoding a batch: {0}")]
    Encoding(postcard::Error),
    #[error("spill file: batch {0} missing")]
    Missing(u64),
}

impl From<redb::Error> for SpillError {
    fn from(error: redb::Error) -> Self {
        SpillError::Store(error)
    }
}

impl From<postcard::Error> for SpillError {
    fn from(error: postcard::Error) -> Self {
        SpillError::Encoding(error)
    }
}

/// The slow stream's batches that wait on disk, by sequence number. The file is scratch: after
/// a crash the uncommitted epochs are read again from Kafka, so it is removed at start.
const SPILLED: TableDefinition<u64, &[u8]> = TableDefinition::new("slow_stream_backlog");

/// A worker's spill file; removed when dropped.
pub(crate) struct Spill {
    /// Where the file is (for logs).
    pub(crate) path: PathBuf,
    db: Database,
}

impl Spill {
    /// Creates `<dir>/<name>-worker<worker>.redb`, replacing what an earlier run left.
    pub(crate) fn open(dir: &Path, name: &str, worker: usize) -> Result<Spill, SpillError> {
        let path = dir.join(format!("{name}-worker{worker}.redb"));
        // Scratch only: whatever an earlier run left is re-read from Kafka.
        let _ = std::fs::remove_file(&path);
        let db = Database::builder()
            .set_cache_size(16 << 20)
            .create(&path)
            .map_err(|e| SpillError::Create { path: path.clone(), error: e.into() })?;
        Ok(Spill { path, db })
    }

    /// Stores batch `seq`.
    pub(crate) fn put(&self, seq: u64, events: &[LocatedInput]) -> Result<(), SpillError> {
        let bytes = postcard::to_allocvec(events)?;
        let mut tx = self.db.begin_write().map_err(redb::Error::from)?;
        // Scratch data: no fsync.
        tx.set_durability(Durability::None).map_err(redb::Error::from)?;
        tx.open_table(SPILLED).map_err(redb::Error::from)?.insert(seq, bytes.as_slice()).map_err(redb::Error::from)?;
        tx.commit().map_err(redb::Error::from)?;
        Ok(())
    }

    /// Removes and returns batch `seq`.
    pub(crate) fn take(&self, seq: u64) -> Result<Vec<LocatedInput>, SpillError> {
        let mut tx = self.db.begin_write().map_err(redb::Error::from)?;
        tx.set_durability(Durability::None).map_err(redb::Error::from)?;
        let events = {
            let mut table = tx.open_table(SPILLED).map_err(redb::Error::from)?;
            let bytes = table.remove(seq).map_err(redb::Error::from)?.ok_or(SpillError::Missing(seq))?;
            postcard::from_bytes(bytes.value())?
        };
        tx.commit().map_err(redb::Error::from)?;
        Ok(events)
    }
}

impl Drop for Spill {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
