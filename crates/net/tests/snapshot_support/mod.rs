//! What the snapshot tests share: seeded snapshot files made quickly, a
//! byte-for-byte comparison, a sender on loopback, and a scripted fake
//! sender for malformed-input tests.

// Each test binary uses a part of this.
#![allow(dead_code)]

use std::fs::File;
use std::future::Future;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use skiff_net::{
    Channel, FetchOptions, Frame, FrameDecoder, Hello, ServerOptions, SnapshotFiles, SnapshotMeta,
    SnapshotServer,
};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

pub const CLUSTER: u64 = 7;
pub const SENDER: u64 = 1;

/// Far above what any test needs on a busy machine; only a hang hits it.
pub const TEST_DEADLINE: Duration = Duration::from_secs(300);

/// Fails the test if `fut` has not finished within [`TEST_DEADLINE`].
pub async fn deadline<T>(fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(TEST_DEADLINE, fut)
        .await
        .expect("test hung past its deadline")
}

/// The Hello of receiver `node`.
pub fn hello(node: u64) -> Hello {
    Hello {
        cluster_id: CLUSTER,
        from: node,
        to: SENDER,
        channel: Channel::Snapshot,
    }
}

/// Options for tests: quick reconnects, otherwise the defaults.
pub fn fetch_opts(chunk_bytes: u32, streams: usize, inflight: usize) -> FetchOptions {
    FetchOptions {
        chunk_bytes,
        streams,
        chunks_inflight_per_stream: inflight,
        reconnect_backoff: Duration::from_millis(5),
        ..FetchOptions::default()
    }
}

pub fn server_opts() -> ServerOptions {
    ServerOptions::new(CLUSTER, SENDER)
}

/// A sender on an ephemeral loopback port.
pub async fn start_server(files: Arc<SnapshotFiles>, opts: ServerOptions) -> SnapshotServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    SnapshotServer::serve(listener, files, opts).unwrap()
}

/// Writes `len` bytes of a pattern seeded by `seed` (xorshift64*, so that
/// no two chunks look alike and a chunk written at the wrong offset shows)
/// and returns the file's meta as snapshot (`index`, `term`).
pub fn write_snapshot(path: &Path, len: u64, seed: u64, index: u64, term: u64) -> SnapshotMeta {
    const PIECE: usize = 4 << 20;
    let mut file = File::create(path).unwrap();
    let mut state = seed | 1;
    let mut buf = vec![0u8; PIECE];
    let mut crc = 0u32;
    let mut left = len;
    while left > 0 {
        let n = left.min(PIECE as u64) as usize;
        for word in buf[..n].chunks_mut(8) {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let v = state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            word.copy_from_slice(&v[..word.len()]);
        }
        file.write_all(&buf[..n]).unwrap();
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        left -= n as u64;
    }
    SnapshotMeta {
        index,
        term,
        len,
        crc,
    }
}

/// Panics, naming the first differing offset, unless the files are equal.
pub fn assert_same_file(expected: &Path, actual: &Path) {
    const PIECE: usize = 4 << 20;
    let (mut a, mut b) = (File::open(expected).unwrap(), File::open(actual).unwrap());
    let (la, lb) = (a.metadata().unwrap().len(), b.metadata().unwrap().len());
    assert_eq!(la, lb, "{actual:?} has {lb} bytes, {expected:?} has {la}");
    let (mut ba, mut bb) = (vec![0u8; PIECE], vec![0u8; PIECE]);
    let mut offset = 0u64;
    while offset < la {
        let n = (la - offset).min(PIECE as u64) as usize;
        a.read_exact(&mut ba[..n]).unwrap();
        b.read_exact(&mut bb[..n]).unwrap();
        if ba[..n] != bb[..n] {
            let at = ba[..n]
                .iter()
                .zip(&bb[..n])
                .position(|(x, y)| x != y)
                .unwrap();
            panic!(
                "{actual:?} differs from {expected:?} at byte {}",
                offset + at as u64
            );
        }
        offset += n as u64;
    }
}

/// The names of the files in `dir`, sorted.
pub fn dir_entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A source directory holding snapshot files, and a provider serving them.
pub struct Source {
    pub dir: tempfile::TempDir,
    pub files: Arc<SnapshotFiles>,
}

impl Source {
    pub fn new() -> Source {
        Source {
            dir: tempfile::tempdir().unwrap(),
            files: Arc::new(SnapshotFiles::new()),
        }
    }

    /// Writes a seeded snapshot file of `len` bytes and serves it.
    pub fn add(&self, len: u64, seed: u64, index: u64, term: u64) -> (PathBuf, SnapshotMeta) {
        let path = self.dir.path().join(format!("source-{index}-{term}"));
        let meta = write_snapshot(&path, len, seed, index, term);
        self.files.insert(path.clone(), meta);
        (path, meta)
    }
}

// ---------------------------------------------------------------------------
// A fake sender: answers each connection with a script.

/// One connection to a fake sender, as the script sees it.
pub struct FakeConn {
    pub stream: TcpStream,
    buf: BytesMut,
    dec: FrameDecoder,
}

impl FakeConn {
    /// The next frame the receiver sent (`None` once it closed).
    pub async fn read_frame(&mut self) -> Option<Frame> {
        loop {
            if let Some(frame) = self.dec.decode(&mut self.buf).unwrap() {
                return Some(frame);
            }
            self.buf.reserve(4096);
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }
}

/// A fake sender on loopback that runs `script` on every connection it
/// accepts (until dropped).
pub async fn fake_sender<F, Fut>(script: F) -> (SocketAddr, tokio::task::JoinHandle<()>)
where
    F: Fn(FakeConn) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let conn = FakeConn {
                stream,
                buf: BytesMut::new(),
                dec: FrameDecoder::new(1 << 20),
            };
            tokio::spawn(script(conn));
        }
    });
    (addr, task)
}
