//! What the runtime knows of each member besides its id: its name, peer
//! URLs and client URLs ([`MemberInfo`]), carried as the member's meta in
//! the Raft membership (so it is replicated with each change and kept in
//! snapshots), and the "removed" marker a member removed from its cluster
//! leaves in its data directory.
//!
//! Members of the initial cluster have no meta until something sets it;
//! their addresses come from `initial_cluster` / `initial_cluster_clients`
//! (every member is started with them). Members added later carry their
//! peer URLs from `MemberAdd`, and their client URLs once they published
//! them.
//!
//! Meta encoding (version 1): `| 1 u8 | name | n u16 | n × peer url |
//! n u16 | n × client url |`, each string a u16 LE length then UTF-8.

use std::path::{Path, PathBuf};

use bytes::{BufMut, Bytes, BytesMut};
use skiff_net::PeerAddr;
use skiff_raft::{Membership, NodeId};

use crate::config::NodeConfig;

/// First byte of an encoded [`MemberInfo`].
const META_VERSION: u8 = 1;
/// URLs per list accepted (a member listens on a few addresses at most).
pub const MEMBER_URLS_MAX: usize = 16;
/// Bytes per name or URL accepted.
pub const MEMBER_STRING_BYTES_MAX: usize = 256;
/// The file a removed member leaves in its data directory; a node whose
/// data directory holds it refuses to start.
pub const REMOVED_MARKER: &str = "removed";

/// A member as the Cluster API shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemberInfo {
    pub name: String,
    pub peer_urls: Vec<String>,
    pub client_urls: Vec<String>,
}

impl MemberInfo {
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(META_VERSION);
        put_str(&mut b, &self.name);
        for list in [&self.peer_urls, &self.client_urls] {
            b.put_u16_le(list.len() as u16);
            for u in list {
                put_str(&mut b, u);
            }
        }
        b.freeze()
    }

    pub fn decode(mut b: &[u8]) -> Result<MemberInfo, String> {
        match b.split_first() {
            Some((&META_VERSION, rest)) => b = rest,
            Some((v, _)) => return Err(format!("member meta version {v} is not known")),
            None => return Err("empty member meta".into()),
        }
        let name = get_str(&mut b)?;
        let mut lists = [Vec::new(), Vec::new()];
        for list in &mut lists {
            let n = get_u16(&mut b)? as usize;
            if n > MEMBER_URLS_MAX {
                return Err(format!("{n} URLs in member meta"));
            }
            for _ in 0..n {
                list.push(get_str(&mut b)?);
            }
        }
        if !b.is_empty() {
            return Err(format!("{} trailing bytes in member meta", b.len()));
        }
        let [peer_urls, client_urls] = lists;
        Ok(MemberInfo {
            name,
            peer_urls,
            client_urls,
        })
    }

    /// Checks what a client may give: names and URLs within bounds, peer
    /// URLs that [`parse_url`] accepts.
    pub fn validate(&self) -> Result<(), String> {
        if self.name.len() > MEMBER_STRING_BYTES_MAX {
            return Err(format!("name over {MEMBER_STRING_BYTES_MAX} bytes"));
        }
        for list in [&self.peer_urls, &self.client_urls] {
            if list.len() > MEMBER_URLS_MAX {
                return Err(format!("more than {MEMBER_URLS_MAX} URLs"));
            }
            for u in list {
                if u.len() > MEMBER_STRING_BYTES_MAX {
                    return Err(format!("URL over {MEMBER_STRING_BYTES_MAX} bytes"));
                }
                parse_url(u)?;
            }
        }
        Ok(())
    }
}

fn put_str(b: &mut BytesMut, s: &str) {
    let s = &s.as_bytes()[..s.len().min(MEMBER_STRING_BYTES_MAX)];
    b.put_u16_le(s.len() as u16);
    b.put_slice(s);
}

fn get_u16(b: &mut &[u8]) -> Result<u16, String> {
    let Some((n, rest)) = b.split_first_chunk::<2>() else {
        return Err("truncated member meta".into());
    };
    *b = rest;
    Ok(u16::from_le_bytes(*n))
}

fn get_str(b: &mut &[u8]) -> Result<String, String> {
    let n = get_u16(b)? as usize;
    if n > MEMBER_STRING_BYTES_MAX || b.len() < n {
        return Err("truncated member meta".into());
    }
    let s = std::str::from_utf8(&b[..n]).map_err(|_| "member meta is not UTF-8".to_string())?;
    *b = &b[n..];
    Ok(s.to_string())
}

/// The address of a URL `http://host:port` (or `https://`, or bare
/// `host:port`): an IP address or a host name, and a port other than 0. A
/// host name is resolved by the transport each time it connects, never by
/// the event loop.
pub fn parse_url(url: &str) -> Result<PeerAddr, String> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .unwrap_or(url);
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    rest.parse::<PeerAddr>()
        .map_err(|e| format!("URL {url:?} is not http://HOST:PORT: {e}"))
}

/// A URL for an address, as the Cluster API shows it.
pub fn url_of(addr: impl std::fmt::Display) -> String {
    format!("http://{addr}")
}

/// What is known of member `id`: its meta in `m`, else the configuration.
pub fn member_info(m: &Membership, cfg: &NodeConfig, id: NodeId) -> MemberInfo {
    let meta = m.meta.get(&id).and_then(|b| MemberInfo::decode(b).ok());
    let known = meta.is_some();
    let mut info = meta.unwrap_or_default();
    if !known {
        // A member of the initial cluster. One added later has no name
        // until it started and published its client URLs (etcdctl then
        // shows it "unstarted", as etcd does).
        info.name = default_name(id);
    }
    if info.peer_urls.is_empty() {
        if let Some(a) = cfg.initial_cluster.get(&id) {
            info.peer_urls.push(url_of(a));
        }
    }
    if info.client_urls.is_empty() {
        let own = (id == cfg.id).then(|| PeerAddr::from(cfg.listen_client));
        if let Some(a) = own.or_else(|| cfg.initial_cluster_clients.get(&id).cloned()) {
            info.client_urls.push(url_of(a));
        }
    }
    info
}

/// The name of a member that was not given one.
pub fn default_name(id: NodeId) -> String {
    format!("skiff-{id}")
}

/// Where to send Raft messages for `id`.
pub fn peer_addr(m: &Membership, cfg: &NodeConfig, id: NodeId) -> Option<PeerAddr> {
    member_info(m, cfg, id)
        .peer_urls
        .iter()
        .find_map(|u| parse_url(u).ok())
}

/// Where `id` serves clients.
pub fn client_addr(m: &Membership, cfg: &NodeConfig, id: NodeId) -> Option<PeerAddr> {
    member_info(m, cfg, id)
        .client_urls
        .iter()
        .find_map(|u| parse_url(u).ok())
}

fn marker(data_dir: &Path) -> PathBuf {
    data_dir.join(REMOVED_MARKER)
}

/// Records durably that this member was removed from its cluster.
pub fn mark_removed(data_dir: &Path, why: &str) -> std::io::Result<()> {
    let path = marker(data_dir);
    let f = std::fs::File::create(&path)?;
    std::io::Write::write_all(&mut &f, why.as_bytes())?;
    f.sync_all()?;
    Ok(crate::storage::sync_dir(data_dir)?)
}

/// The removal recorded in `data_dir`, if any.
pub fn removed(data_dir: &Path) -> Option<String> {
    std::fs::read_to_string(marker(data_dir)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_round_trips_and_corruption_is_an_error() {
        let info = MemberInfo {
            name: "four".into(),
            peer_urls: vec!["http://127.0.0.1:7004".into()],
            client_urls: vec!["http://127.0.0.1:8004".into(), "http://[::1]:8004".into()],
        };
        let b = info.encode();
        assert_eq!(MemberInfo::decode(&b).unwrap(), info);
        for cut in 0..b.len() {
            assert!(MemberInfo::decode(&b[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = b.to_vec();
        long.push(0);
        assert!(MemberInfo::decode(&long).is_err());
        let mut other = b.to_vec();
        other[0] = 9;
        assert!(MemberInfo::decode(&other).is_err());
    }

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("http://127.0.0.1:7001").unwrap(),
            "127.0.0.1:7001".parse().unwrap()
        );
        assert_eq!(
            parse_url("https://[::1]:7001/").unwrap(),
            "[::1]:7001".parse().unwrap()
        );
        let named = parse_url("http://Node-2.example.com:7001/").unwrap();
        assert_eq!(named.to_string(), "node-2.example.com:7001");
        assert_eq!(
            parse_url("localhost:7001").unwrap().to_string(),
            "localhost:7001"
        );
        for bad in [
            "",
            "http://",
            "http://exa_mple.com:7001",
            "ftp://10.0.0.1:7001",
            "http://10.0.0.1:7001/path",
            "127.0.0.1",
            "10.0.0.1:0",
            "x:y",
        ] {
            assert!(parse_url(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn removal_marker() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(removed(d.path()), None);
        mark_removed(d.path(), "removed by member 1").unwrap();
        assert_eq!(removed(d.path()).as_deref(), Some("removed by member 1"));
    }
}
