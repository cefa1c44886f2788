//! A disk that lies: an in-memory FUSE file system whose writes are durable
//! only once fsynced, for the fault campaigns ([`crate::nemesis`]).
//!
//! Every file keeps two contents: what reads see (`live`) and what
//! survives a power loss (`durable`, copied from `live` by `fsync` and
//! `fdatasync`). Every directory keeps its live entries and its durable
//! ones (copied by an fsync of the directory itself: a file created,
//! renamed or unlinked is durable only then — what POSIX promises, less than
//! ext4 usually gives). [`LyingDisk::lose_power`] throws away everything not
//! yet durable: the member that ran on the disk (killed first) finds, when it
//! starts again, exactly what it had fsynced. [`LyingDisk::fail_next_fsync`]
//! makes the next fsync of a matching file fail with `EIO` and lose what it
//! should have made durable, as a failing device does.
//!
//! Files are opened with `FOPEN_DIRECT_IO`, so the kernel keeps no page
//! cache of them that could outlive a power loss, and attributes and
//! entries are never cached (time-to-live zero). Contents are kept in 4 KiB
//! pages; all-zero pages are not stored (a pre-written WAL segment costs no
//! memory).
//!
//! Mounting needs root (the `mount` system call) and `/dev/fuse`;
//! [`LyingDisk::mount`] says which is missing.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
    TimeOrNow, WriteFlags,
};

/// The unit of file contents.
const PAGE: usize = 4096;
/// The capacity `statfs` reports (free space is this less what is stored).
const CAPACITY_BYTES: u64 = 64 << 30;
/// Attributes and entries are never cached by the kernel: a power loss
/// changes them behind its back.
const TTL: Duration = Duration::ZERO;

type Page = Arc<[u8; PAGE]>;

/// A file's contents: its size and its non-zero pages.
#[derive(Clone, Default)]
struct Content {
    size: u64,
    pages: BTreeMap<u64, Page>,
}

impl Content {
    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut done = 0usize;
        while done < data.len() {
            let at = offset + done as u64;
            let index = at / PAGE as u64;
            let within = (at % PAGE as u64) as usize;
            let n = (PAGE - within).min(data.len() - done);
            let chunk = &data[done..done + n];
            match self.pages.get_mut(&index) {
                Some(page) => Arc::make_mut(page)[within..within + n].copy_from_slice(chunk),
                None if chunk.iter().all(|&b| b == 0) => {}
                None => {
                    let mut page = [0u8; PAGE];
                    page[within..within + n].copy_from_slice(chunk);
                    self.pages.insert(index, Arc::new(page));
                }
            }
            if self
                .pages
                .get(&index)
                .is_some_and(|p| p.iter().all(|&b| b == 0))
            {
                self.pages.remove(&index);
            }
            done += n;
        }
        self.size = self.size.max(offset + data.len() as u64);
    }

    fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        if offset >= self.size {
            return Vec::new();
        }
        let len = len.min((self.size - offset) as usize);
        let mut out = vec![0u8; len];
        let mut done = 0usize;
        while done < len {
            let at = offset + done as u64;
            let index = at / PAGE as u64;
            let within = (at % PAGE as u64) as usize;
            let n = (PAGE - within).min(len - done);
            if let Some(page) = self.pages.get(&index) {
                out[done..done + n].copy_from_slice(&page[within..within + n]);
            }
            done += n;
        }
        out
    }

    fn truncate(&mut self, size: u64) {
        if size < self.size {
            let keep = size.div_ceil(PAGE as u64);
            self.pages.retain(|&i, _| i < keep);
            let within = (size % PAGE as u64) as usize;
            if within != 0 {
                if let Some(page) = self.pages.get_mut(&(size / PAGE as u64)) {
                    Arc::make_mut(page)[within..].fill(0);
                }
            }
        }
        self.size = size;
    }

    fn stored_bytes(&self) -> u64 {
        self.pages.len() as u64 * PAGE as u64
    }
}

enum Node {
    File {
        live: Content,
        durable: Content,
    },
    Dir {
        live: BTreeMap<OsString, u64>,
        durable: BTreeMap<OsString, u64>,
    },
}

impl Node {
    fn empty_dir() -> Node {
        Node::Dir {
            live: BTreeMap::new(),
            durable: BTreeMap::new(),
        }
    }

    fn empty_file() -> Node {
        Node::File {
            live: Content::default(),
            durable: Content::default(),
        }
    }
}

/// The permission bits a new file or directory gets.
fn perm(mode: u32, umask: u32) -> u16 {
    (mode & !umask & 0o7777) as u16
}

struct Inode {
    node: Node,
    perm: u16,
    mtime: SystemTime,
    /// The name it was last linked under (what [`LyingDisk::fail_next_fsync`]
    /// matches).
    name: OsString,
}

/// What a power loss threw away.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PowerLoss {
    /// Files whose contents or size went back to their last fsync.
    pub files_reverted: usize,
    /// Directory entries created, renamed or removed since the directory's
    /// last fsync that were undone.
    pub entries_reverted: usize,
    /// Fsyncs that were in flight when the power went (see
    /// [`LyingDisk::cut_power_at_next_fsync`]); they never completed.
    pub fsyncs_in_flight: usize,
}

/// Counts of what the disk did, for the tests' reports.
#[derive(Debug, Default, Clone, Copy)]
pub struct DiskStats {
    pub fsyncs: u64,
    pub failed_fsyncs: u64,
    pub power_losses: u64,
}

/// The disk's power.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Power {
    On,
    /// Cut (see [`LyingDisk::cut_power_at_next_fsync`]): no fsync completes
    /// (each is held unanswered until [`Fs::lose_power`]); writes still
    /// land in what reads see, and are lost with the rest.
    Cut,
    /// Lost ([`Fs::lose_power`]) and not back yet: every change fails with
    /// `EIO`, so that nothing a dying process still sends lands after the
    /// loss; reads see what survived.
    Off,
}

struct Fs {
    inodes: BTreeMap<u64, Inode>,
    next_ino: u64,
    /// An armed fault: the next fsync of a file whose name this accepts
    /// fails with `EIO`.
    fail_fsync: Option<fn(&str) -> bool>,
    /// Files whose fsyncs succeed without making anything durable (a disk
    /// that ignores cache flushes): only for tests that show a lost write
    /// is noticed.
    ignore_fsync: Option<fn(&str) -> bool>,
    /// An armed power cut: it happens at the next fsync of a file whose
    /// name this accepts.
    cut_at_fsync: Option<fn(&str) -> bool>,
    power: Power,
    /// The fsyncs held while dark.
    held: Vec<ReplyEmpty>,
    /// A stall (see [`LyingDisk::stall_fsyncs`]): fsyncs of files whose
    /// name this accepts wait, unanswered, until it ends.
    stall: Option<fn(&str) -> bool>,
    /// The fsyncs a stall holds: the inode and the reply.
    stalled: Vec<(u64, ReplyEmpty)>,
    stats: DiskStats,
}

impl Fs {
    fn new() -> Fs {
        let mut inodes = BTreeMap::new();
        inodes.insert(
            INodeNo::ROOT.0,
            Inode {
                node: Node::empty_dir(),
                perm: 0o755,
                mtime: SystemTime::now(),
                name: OsString::from("/"),
            },
        );
        Fs {
            inodes,
            next_ino: INodeNo::ROOT.0 + 1,
            fail_fsync: None,
            ignore_fsync: None,
            cut_at_fsync: None,
            power: Power::On,
            held: Vec::new(),
            stall: None,
            stalled: Vec::new(),
            stats: DiskStats::default(),
        }
    }

    /// Changes fail while the power is off.
    fn writable(&self) -> Result<(), Errno> {
        match self.power {
            Power::Off => Err(Errno::EIO),
            Power::On | Power::Cut => Ok(()),
        }
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let inode = self.inodes.get(&ino)?;
        let (kind, size, nlink) = match &inode.node {
            Node::File { live, .. } => (FileType::RegularFile, live.size, 1),
            Node::Dir { .. } => (FileType::Directory, 0, 2),
        };
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: inode.mtime,
            mtime: inode.mtime,
            ctime: inode.mtime,
            crtime: inode.mtime,
            kind,
            perm: inode.perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: PAGE as u32,
            flags: 0,
        })
    }

    fn dir(&self, ino: u64) -> Result<&BTreeMap<OsString, u64>, Errno> {
        match self.inodes.get(&ino).map(|i| &i.node) {
            Some(Node::Dir { live, .. }) => Ok(live),
            Some(Node::File { .. }) => Err(Errno::ENOTDIR),
            None => Err(Errno::ENOENT),
        }
    }

    fn dir_mut(&mut self, ino: u64) -> Result<&mut BTreeMap<OsString, u64>, Errno> {
        match self.inodes.get_mut(&ino).map(|i| &mut i.node) {
            Some(Node::Dir { live, .. }) => Ok(live),
            Some(Node::File { .. }) => Err(Errno::ENOTDIR),
            None => Err(Errno::ENOENT),
        }
    }

    fn file_mut(&mut self, ino: u64) -> Result<&mut Content, Errno> {
        match self.inodes.get_mut(&ino).map(|i| &mut i.node) {
            Some(Node::File { live, .. }) => Ok(live),
            Some(Node::Dir { .. }) => Err(Errno::EISDIR),
            None => Err(Errno::ENOENT),
        }
    }

    /// Links a new inode under `parent`.
    fn create(&mut self, parent: u64, name: &OsStr, node: Node, perm: u16) -> Result<u64, Errno> {
        self.writable()?;
        if self.dir(parent)?.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.inodes.insert(
            ino,
            Inode {
                node,
                perm,
                mtime: SystemTime::now(),
                name: name.to_owned(),
            },
        );
        self.dir_mut(parent)?.insert(name.to_owned(), ino);
        Ok(ino)
    }

    fn remove(&mut self, parent: u64, name: &OsStr, want_dir: bool) -> Result<(), Errno> {
        self.writable()?;
        let ino = *self.dir(parent)?.get(name).ok_or(Errno::ENOENT)?;
        match (&self.inodes[&ino].node, want_dir) {
            (Node::Dir { live, .. }, true) if !live.is_empty() => return Err(Errno::ENOTEMPTY),
            (Node::Dir { .. }, false) => return Err(Errno::EISDIR),
            (Node::File { .. }, true) => return Err(Errno::ENOTDIR),
            _ => {}
        }
        self.dir_mut(parent)?.remove(name);
        Ok(())
    }

    fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        flags: RenameFlags,
    ) -> Result<(), Errno> {
        self.writable()?;
        if flags.contains(RenameFlags::RENAME_EXCHANGE)
            || flags.contains(RenameFlags::RENAME_WHITEOUT)
        {
            return Err(Errno::EINVAL);
        }
        let ino = *self.dir(parent)?.get(name).ok_or(Errno::ENOENT)?;
        if let Some(&target) = self.dir(new_parent)?.get(new_name) {
            if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                return Err(Errno::EEXIST);
            }
            if target == ino {
                return Ok(());
            }
            match (&self.inodes[&ino].node, &self.inodes[&target].node) {
                (Node::Dir { .. }, Node::Dir { live, .. }) if !live.is_empty() => {
                    return Err(Errno::ENOTEMPTY)
                }
                (Node::Dir { .. }, Node::File { .. }) => return Err(Errno::ENOTDIR),
                (Node::File { .. }, Node::Dir { .. }) => return Err(Errno::EISDIR),
                _ => {}
            }
        }
        self.dir_mut(parent)?.remove(name);
        self.dir_mut(new_parent)?.insert(new_name.to_owned(), ino);
        if let Some(inode) = self.inodes.get_mut(&ino) {
            inode.name = new_name.to_owned();
        }
        Ok(())
    }

    /// `Ok(true)`: durable now; `Ok(false)`: the power is cut, hold the
    /// reply.
    fn fsync(&mut self, ino: u64) -> Result<bool, Errno> {
        let inode = self.inodes.get_mut(&ino).ok_or(Errno::ENOENT)?;
        self.stats.fsyncs += 1;
        match self.power {
            Power::On => {}
            Power::Cut => return Ok(false),
            Power::Off => return Err(Errno::EIO),
        }
        if let Some(matches) = self.cut_at_fsync {
            if matches(&inode.name.to_string_lossy()) {
                self.cut_at_fsync = None;
                self.power = Power::Cut;
                return Ok(false);
            }
        }
        if let (Some(matches), Node::File { live, durable }) = (self.fail_fsync, &mut inode.node) {
            if matches(&inode.name.to_string_lossy()) {
                // The device lost the writes: what reads see goes back to
                // what was durable, and the caller hears EIO.
                self.fail_fsync = None;
                self.stats.failed_fsyncs += 1;
                *live = durable.clone();
                return Err(Errno::EIO);
            }
        }
        if let (Some(matches), Node::File { .. }) = (self.ignore_fsync, &inode.node) {
            if matches(&inode.name.to_string_lossy()) {
                return Ok(true);
            }
        }
        match &mut inode.node {
            Node::File { live, durable } => *durable = live.clone(),
            Node::Dir { live, durable } => *durable = live.clone(),
        }
        Ok(true)
    }

    fn lose_power(&mut self) -> PowerLoss {
        let mut loss = PowerLoss {
            fsyncs_in_flight: self.held.len(),
            ..PowerLoss::default()
        };
        // Their callers are gone; dropping a reply answers EIO.
        self.held.clear();
        self.stalled.clear();
        self.stall = None;
        self.power = Power::Off;
        self.cut_at_fsync = None;
        for inode in self.inodes.values_mut() {
            match &mut inode.node {
                Node::File { live, durable } => {
                    if live.size != durable.size || live.pages != durable.pages {
                        loss.files_reverted += 1;
                        *live = durable.clone();
                    }
                }
                Node::Dir { live, durable } => {
                    let before: BTreeSet<_> = live.iter().collect();
                    let after: BTreeSet<_> = durable.iter().collect();
                    loss.entries_reverted += before.symmetric_difference(&after).count();
                    *live = durable.clone();
                }
            }
        }
        // What no durable entry reaches is gone.
        let mut reachable = BTreeSet::from([INodeNo::ROOT.0]);
        let mut todo = vec![INodeNo::ROOT.0];
        while let Some(ino) = todo.pop() {
            if let Some(Node::Dir { live, .. }) = self.inodes.get(&ino).map(|i| &i.node) {
                for &child in live.values() {
                    if reachable.insert(child) {
                        todo.push(child);
                    }
                }
            }
        }
        self.inodes.retain(|ino, _| reachable.contains(ino));
        self.stats.power_losses += 1;
        loss
    }

    fn stored_bytes(&self) -> u64 {
        self.inodes
            .values()
            .map(|i| match &i.node {
                Node::File { live, durable } => live.stored_bytes() + durable.stored_bytes(),
                Node::Dir { .. } => 0,
            })
            .sum()
    }
}

impl PartialEq for Content {
    fn eq(&self, other: &Content) -> bool {
        self.size == other.size && self.pages == other.pages
    }
}

/// The FUSE side: every request takes the one lock.
struct Server(Arc<Mutex<Fs>>);

impl Server {
    fn fs(&self) -> MutexGuard<'_, Fs> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// fsync and fsyncdir: answered now, or held while the power is cut or
    /// the disk stalls.
    fn sync(&self, ino: INodeNo, reply: ReplyEmpty) {
        let mut fs = self.fs();
        if let Some(matches) = fs.stall {
            let name = fs
                .inodes
                .get(&ino.0)
                .map(|i| i.name.to_string_lossy().into_owned());
            if fs.power == Power::On && name.is_some_and(|n| matches(&n)) {
                fs.stalled.push((ino.0, reply));
                return;
            }
        }
        match fs.fsync(ino.0) {
            Ok(true) => reply.ok(),
            Ok(false) => fs.held.push(reply),
            Err(e) => reply.error(e),
        }
    }
}

fn reply_entry(fs: &Fs, ino: u64, reply: ReplyEntry) {
    match fs.attr(ino) {
        Some(attr) => reply.entry(&TTL, &attr, Generation(0)),
        None => reply.error(Errno::ENOENT),
    }
}

impl Filesystem for Server {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let fs = self.fs();
        match fs.dir(parent.0).map(|d| d.get(name).copied()) {
            Ok(Some(ino)) => reply_entry(&fs, ino, reply),
            Ok(None) => reply.error(Errno::ENOENT),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.fs().attr(ino.0) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut fs = self.fs();
        if let Err(e) = fs.writable() {
            return reply.error(e);
        }
        if let Some(size) = size {
            match fs.file_mut(ino.0) {
                Ok(content) => content.truncate(size),
                Err(e) => return reply.error(e),
            }
        }
        let Some(inode) = fs.inodes.get_mut(&ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        if let Some(mode) = mode {
            inode.perm = (mode & 0o7777) as u16;
        }
        inode.mtime = match mtime {
            Some(TimeOrNow::SpecificTime(t)) => t,
            _ => SystemTime::now(),
        };
        match fs.attr(ino.0) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let mut fs = self.fs();
        match fs.create(parent.0, name, Node::empty_dir(), perm(mode, umask)) {
            Ok(ino) => reply_entry(&fs, ino, reply),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.fs().remove(parent.0, name, false) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.fs().remove(parent.0, name, true) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        match self
            .fs()
            .rename(parent.0, name, newparent.0, newname, flags)
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.fs().inodes.get(&ino.0).map(|i| &i.node) {
            Some(Node::File { .. }) => reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO),
            Some(Node::Dir { .. }) => reply.error(Errno::EISDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let mut fs = self.fs();
        match fs.create(parent.0, name, Node::empty_file(), perm(mode, umask)) {
            Ok(ino) => match fs.attr(ino) {
                Some(attr) => reply.created(
                    &TTL,
                    &attr,
                    Generation(0),
                    FileHandle(0),
                    FopenFlags::FOPEN_DIRECT_IO,
                ),
                None => reply.error(Errno::ENOENT),
            },
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.fs().file_mut(ino.0) {
            Ok(content) => reply.data(&content.read(offset, size as usize)),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut fs = self.fs();
        if let Err(e) = fs.writable() {
            return reply.error(e);
        }
        match fs.file_mut(ino.0) {
            Ok(content) => {
                content.write(offset, data);
                if let Some(inode) = fs.inodes.get_mut(&ino.0) {
                    inode.mtime = SystemTime::now();
                }
                reply.written(data.len() as u32)
            }
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.sync(ino, reply);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let fs = self.fs();
        let entries = match fs.dir(ino.0) {
            Ok(d) => d,
            Err(e) => return reply.error(e),
        };
        let mut all: Vec<(u64, FileType, OsString)> = vec![
            (ino.0, FileType::Directory, ".".into()),
            (ino.0, FileType::Directory, "..".into()),
        ];
        for (name, &child) in entries {
            let kind = match fs.inodes.get(&child).map(|i| &i.node) {
                Some(Node::Dir { .. }) => FileType::Directory,
                _ => FileType::RegularFile,
            };
            all.push((child, kind, name.clone()));
        }
        for (i, (child, kind, name)) in all.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*child), i as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.sync(ino, reply);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let fs = self.fs();
        let blocks = CAPACITY_BYTES / PAGE as u64;
        let free = blocks.saturating_sub(fs.stored_bytes() / PAGE as u64);
        let files = fs.inodes.len() as u64;
        reply.statfs(
            blocks,
            free,
            free,
            files + 1_000_000,
            1_000_000,
            PAGE as u32,
            255,
            PAGE as u32,
        );
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if mode & !libc::FALLOC_FL_KEEP_SIZE != 0 {
            return reply.error(Errno::EOPNOTSUPP);
        }
        let mut fs = self.fs();
        if let Err(e) = fs.writable() {
            return reply.error(e);
        }
        match fs.file_mut(ino.0) {
            Ok(content) => {
                if mode & libc::FALLOC_FL_KEEP_SIZE == 0 {
                    content.size = content.size.max(offset + length);
                }
                reply.ok()
            }
            Err(e) => reply.error(e),
        }
    }
}

/// A mounted lying disk (see the module docs). Dropping it unmounts it.
pub struct LyingDisk {
    fs: Arc<Mutex<Fs>>,
    session: Option<BackgroundSession>,
    mountpoint: PathBuf,
}

impl LyingDisk {
    /// Mounts an empty lying disk on `mountpoint` (an existing, empty
    /// directory). Fails with the reason where this process may not mount
    /// a FUSE file system.
    pub fn mount(mountpoint: &Path) -> Result<LyingDisk, String> {
        if !Path::new("/dev/fuse").exists() {
            return Err("/dev/fuse is absent (no FUSE in this kernel or container)".into());
        }
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("mounting a FUSE file system here needs root".into());
        }
        let fs = Arc::new(Mutex::new(Fs::new()));
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName(FS_NAME.into()),
            MountOption::Subtype(FS_NAME.into()),
        ];
        let session = fuser::spawn_mount(Server(fs.clone()), mountpoint, &config).map_err(|e| {
            format!(
                "mounting a FUSE file system on {}: {e}",
                mountpoint.display()
            )
        })?;
        Ok(LyingDisk {
            fs,
            session: Some(session),
            mountpoint: mountpoint.to_path_buf(),
        })
    }

    /// Where it is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    fn fs(&self) -> MutexGuard<'_, Fs> {
        self.fs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Throws away every write, creation, rename and removal not yet made
    /// durable by an fsync, and fails the fsyncs a power cut held. Send
    /// `SIGKILL` to whatever runs on the disk first (a process whose fsync
    /// is held cannot exit before this answers it). The power stays off —
    /// every change fails with `EIO`, reads see what survived — until
    /// [`LyingDisk::power_on`].
    pub fn lose_power(&self) -> PowerLoss {
        self.fs().lose_power()
    }

    /// Brings the power back after [`LyingDisk::lose_power`] (reap the
    /// processes that ran on the disk first).
    pub fn power_on(&self) {
        self.fs().power = Power::On;
    }

    /// The next fsync of a file whose name `matches` accepts fails with
    /// `EIO`, and the file loses every write since its last fsync.
    pub fn fail_next_fsync(&self, matches: fn(&str) -> bool) {
        self.fs().fail_fsync = Some(matches);
    }

    /// The power goes at the next fsync of a file whose name `matches`
    /// accepts — a moment when a write is known to be in flight: from then
    /// on no fsync completes (each waits, unanswered, for
    /// [`LyingDisk::lose_power`]). Kill whatever runs on the disk once
    /// [`LyingDisk::is_dark`], then call [`LyingDisk::lose_power`].
    pub fn cut_power_at_next_fsync(&self, matches: fn(&str) -> bool) {
        self.fs().cut_at_fsync = Some(matches);
    }

    /// From now on, fsyncs of files whose name `matches` accepts wait,
    /// unanswered (a disk that stopped answering: the caller's thread
    /// hangs in fsync), until [`LyingDisk::end_stall`]. Writes still land.
    pub fn stall_fsyncs(&self, matches: fn(&str) -> bool) {
        self.fs().stall = Some(matches);
    }

    /// Ends a stall: each fsync it held completes now (makes its file
    /// durable, or fails as the disk's state says) and is answered.
    /// Returns how many it held.
    pub fn end_stall(&self) -> usize {
        let mut fs = self.fs();
        fs.stall = None;
        let stalled = std::mem::take(&mut fs.stalled);
        let n = stalled.len();
        for (ino, reply) in stalled {
            match fs.fsync(ino) {
                Ok(true) => reply.ok(),
                Ok(false) => fs.held.push(reply),
                Err(e) => reply.error(e),
            }
        }
        n
    }

    /// Whether the power is cut or off (see
    /// [`LyingDisk::cut_power_at_next_fsync`]).
    pub fn is_dark(&self) -> bool {
        self.fs().power != Power::On
    }

    /// Whether a fault armed by [`LyingDisk::fail_next_fsync`] is still
    /// waiting for its fsync.
    pub fn fsync_fault_armed(&self) -> bool {
        self.fs().fail_fsync.is_some()
    }

    /// From now on, fsyncs of files whose name `matches` accepts succeed
    /// and make nothing durable: a disk that ignores cache flushes. Only
    /// for tests that show the harness notices what such a disk loses.
    pub fn ignore_fsyncs(&self, matches: fn(&str) -> bool) {
        self.fs().ignore_fsync = Some(matches);
    }

    /// Disarms [`LyingDisk::fail_next_fsync`].
    pub fn disarm(&self) {
        self.fs().fail_fsync = None;
    }

    /// What the disk did so far.
    pub fn stats(&self) -> DiskStats {
        self.fs().stats
    }
}

impl Drop for LyingDisk {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            if session.umount_and_join().is_err() {
                // Still busy (a process that has not exited): detach it, so
                // that it goes away with its last user.
                if let Ok(path) = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(
                    self.mountpoint.as_os_str(),
                )) {
                    // SAFETY: a valid NUL-terminated path.
                    unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
                }
            }
        }
    }
}

/// Whether `name` is a WAL segment in use (not a pre-written spare).
pub fn is_wal_segment(name: &str) -> bool {
    name.ends_with(".wal") && !name.starts_with("spare-")
}

/// The name the disks are mounted under (`/proc/mounts`' first field).
const FS_NAME: &str = "skiff-lying-disk";

/// Detaches lying disks left mounted by a test process that died without
/// unmounting them (killed, or timed out): their FUSE connection is gone, so
/// `stat` on them fails with `ENOTCONN`. Live disks of other test processes
/// are left alone. Returns how many were detached.
pub fn sweep_abandoned() -> usize {
    let Ok(mounts) = std::fs::read_to_string("/proc/mounts") else {
        return 0;
    };
    let mut swept = 0;
    for line in mounts.lines() {
        let mut fields = line.split_whitespace();
        let (Some(source), Some(target)) = (fields.next(), fields.next()) else {
            continue;
        };
        if source != FS_NAME {
            continue;
        }
        // /proc/mounts escapes blanks as octal; the harness's paths have none.
        let abandoned = std::fs::metadata(target)
            .err()
            .is_some_and(|e| e.raw_os_error() == Some(libc::ENOTCONN));
        if !abandoned {
            continue;
        }
        if let Ok(path) = std::ffi::CString::new(target) {
            // SAFETY: a valid NUL-terminated path.
            if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } == 0 {
                swept += 1;
            }
        }
    }
    swept
}

/// Whether this process can mount a lying disk: `Err` says why not.
/// Detaches abandoned disks first ([`sweep_abandoned`]).
pub fn available() -> Result<(), String> {
    sweep_abandoned();
    let dir = tempfile::tempdir().map_err(|e| format!("a temporary directory: {e}"))?;
    LyingDisk::mount(dir.path()).map(drop)
}
