//! Snapshots of the event loop: take one (write the store to a file,
//! durably, then tell the core), offer it to a follower (which fetches it
//! in parallel chunks), install a fetched one, record it in the WAL and
//! compact.

use super::*;

/// What a follower is told to fetch a snapshot from: carried as the `data`
/// of the `InstallSnapshot` message (`len` u64 LE, `crc` u32 LE, then the
/// leader's snapshot server address as text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotOffer {
    pub len: u64,
    pub crc: u32,
    pub addr: SocketAddr,
}

impl SnapshotOffer {
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(12 + 48);
        b.extend_from_slice(&self.len.to_le_bytes());
        b.extend_from_slice(&self.crc.to_le_bytes());
        b.extend_from_slice(self.addr.to_string().as_bytes());
        b.freeze()
    }

    pub fn decode(b: &[u8]) -> Option<SnapshotOffer> {
        let (len, rest) = b.split_first_chunk::<8>()?;
        let (crc, rest) = rest.split_first_chunk::<4>()?;
        let addr = std::str::from_utf8(rest).ok()?.parse().ok()?;
        Some(SnapshotOffer {
            len: u64::from_le_bytes(*len),
            crc: u32::from_le_bytes(*crc),
            addr,
        })
    }
}

impl EventLoop {
    pub(super) fn on_snapshot_recorded(&mut self, upto: Index) {
        self.snapshot_in_progress = false;
        match self.wal.compact(upto) {
            Ok(n) => tracing::debug!(upto, segments = n, "WAL compacted"),
            Err(e) => tracing::warn!(upto, error = %e, "WAL compaction failed"),
        }
        self.remove_old_snapshots();
    }

    /// Writes the store to a snapshot file, durably, then tells the core.
    pub(super) fn take_snapshot(&mut self) -> Result<(), String> {
        let started = Instant::now();
        let index = self.kv.applied_index();
        if index <= self.last_snapshot_index {
            return Ok(());
        }
        let term = self
            .wal
            .term(index)
            .map_err(|e| format!("term of applied entry {index}: {e}"))?;
        let path = storage::snapshot_path(&self.snap_dir, index, term);
        let (len, crc) = write_snapshot_file(&self.kv, &path)
            .map_err(|e| format!("snapshot {}: {e}", path.display()))?;
        self.stages
            .snapshot_write_us
            .saturating_record(us_since(started));
        tracing::info!(index, term, bytes = len, "snapshot taken");
        let offer = SnapshotOffer {
            len,
            crc,
            addr: self.snapshot_addr,
        };
        self.offer_snapshot(index, term, path, offer);
        self.applied_since_snapshot = (0, 0);
        self.snapshot_in_progress = true;
        self.last_snapshot_index = index;
        self.raft.snapshot_taken(index);
        Ok(())
    }

    pub(super) fn offer_snapshot(
        &mut self,
        index: Index,
        term: u64,
        path: PathBuf,
        offer: SnapshotOffer,
    ) {
        self.snapshots.insert(
            path,
            skiff_net::SnapshotMeta {
                index,
                term,
                len: offer.len,
                crc: offer.crc,
            },
        );
        if let Some((old, _, _)) = self.snapshot.replace((index, term, offer)) {
            if old != index {
                self.snapshots.remove(old);
            }
        }
    }

    /// `Compact`: record the snapshot in the WAL; once durable, compact.
    pub(super) fn record_snapshot(
        &mut self,
        upto: Index,
        membership: &Membership,
    ) -> Result<(), String> {
        let Some((index, term, _)) = self.snapshot.clone() else {
            return Ok(());
        };
        if index != upto {
            return Ok(());
        }
        let mut data = BytesMut::new();
        encode_membership(membership, &mut data);
        let ticket = self
            .wal
            .save_snapshot(skiff_wal::SnapshotMeta {
                index,
                term,
                data: data.freeze(),
            })
            .map_err(|e| format!("WAL snapshot record: {e}"))?;
        self.snapshot_in_progress = true;
        self.wait_for(ticket, Durable::SnapshotRecorded { upto })
    }

    /// `SendSnapshot`: offer our latest snapshot; the follower fetches it.
    pub(super) fn send_snapshot(&mut self, to: NodeId, needed: Index, membership: Membership) {
        let Some((index, term, offer)) = self.snapshot.clone() else {
            tracing::warn!(to, "a follower needs a snapshot but none is held");
            return;
        };
        if index < needed {
            tracing::warn!(to, index, needed, "the snapshot held is older than needed");
            return;
        }
        let msg = Message {
            from: self.cfg.id,
            to,
            term: self.raft.term(),
            body: MessageBody::InstallSnapshot {
                index,
                snapshot_term: term,
                membership,
                data: offer.encode(),
            },
        };
        tracing::info!(to, index, "offering snapshot");
        self.send(msg);
    }

    /// `InstallSnapshot`: restore the store from the fetched file and make
    /// the snapshot the WAL's base.
    pub(super) fn install_snapshot(
        &mut self,
        id: PersistId,
        index: Index,
        term: u64,
        membership: &Membership,
    ) -> Result<(), String> {
        let path = self
            .fetched
            .remove(&index)
            .ok_or_else(|| format!("snapshot {index} to install was not fetched"))?;
        let file = std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
        self.kv = KvStore::read_snapshot(&mut reader)
            .map_err(|e| format!("snapshot {}: {e}", path.display()))?;
        let crc = file_crc(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let canonical = storage::snapshot_path(&self.snap_dir, index, term);
        if canonical != path {
            std::fs::rename(&path, &canonical)
                .map_err(|e| format!("rename {}: {e}", path.display()))?;
            fsync_dir(&self.snap_dir).map_err(|e| format!("{}: {e}", self.snap_dir.display()))?;
        }
        let offer = SnapshotOffer {
            len,
            crc,
            addr: self.snapshot_addr,
        };
        self.offer_snapshot(index, term, canonical, offer);
        self.last_snapshot_index = index;
        self.applied_since_snapshot = (0, 0);
        // Requests waiting on entries the snapshot replaced.
        let stale: Vec<Index> = self.writes.range(..=index).map(|(i, _)| *i).collect();
        for i in stale {
            if let Some(p) = self.writes.remove(&i) {
                let _ = p.reply.send(Err(lost()));
            }
        }
        let mut data = BytesMut::new();
        encode_membership(membership, &mut data);
        let ticket = self
            .wal
            .write(WriteBatch {
                snapshot: Some(skiff_wal::SnapshotMeta {
                    index,
                    term,
                    data: data.freeze(),
                }),
                ..WriteBatch::default()
            })
            .map_err(|e| format!("WAL snapshot record: {e}"))?;
        self.wal_last = self.wal.last_index();
        tracing::info!(index, term, "snapshot installed");
        self.wait_for(ticket, Durable::Persisted(id))
    }

    pub(super) fn remove_old_snapshots(&self) {
        let Ok(dir) = std::fs::read_dir(&self.snap_dir) else {
            return;
        };
        let mut snaps: Vec<(u64, PathBuf)> = dir
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let index = name.strip_prefix("snapshot-")?.get(..20)?.parse().ok()?;
                name.ends_with(".snap").then(|| (index, e.path()))
            })
            .collect();
        snaps.sort();
        let keep = SNAPSHOTS_KEPT + 1;
        if snaps.len() > keep {
            for (_, path) in &snaps[..snaps.len() - keep] {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// A writer that counts and checksums what passes through.
struct CrcWriter<W> {
    inner: W,
    len: u64,
    crc: u32,
}

impl<W: Write> Write for CrcWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes the store to `path` durably (temporary file, fsync, rename,
/// directory fsync); returns its length and CRC32C.
fn write_snapshot_file(kv: &KvStore, path: &Path) -> std::io::Result<(u64, u32)> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    let file = std::fs::File::create(&tmp)?;
    let mut w = CrcWriter {
        inner: std::io::BufWriter::with_capacity(1 << 20, file),
        len: 0,
        crc: 0,
    };
    kv.write_snapshot(&mut w)?;
    w.flush()?;
    let (len, crc) = (w.len, w.crc);
    let file = w.inner.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    fsync_dir(dir)?;
    Ok((len, crc))
}

pub(crate) fn file_crc(path: &Path) -> std::io::Result<u32> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut crc = 0;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(crc);
        }
        crc = crc32c::crc32c_append(crc, &buf[..n]);
    }
}

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}
