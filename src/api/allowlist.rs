//! Who the client is, by address, and whether it may use the admin routes:
//! the optional allow-list of client networks (the runbook's emergency
//! access control) and `X-Forwarded-For` from trusted proxies only.

use std::net::{IpAddr, SocketAddr};

use axum::extract::ConnectInfo;
use axum::http::Request;
use ipnet::IpNet;

/// A network in CIDR form, or a single address (a /32 or /128).
pub fn parse_network(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    if let Ok(net) = text.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    text.parse::<IpAddr>()
        .map(|ip| IpNet::from(ip.to_canonical()))
        .map_err(|_| format!("`{text}` is neither an IP address nor a CIDR network"))
}

/// A list of networks; an empty list contains every address.
#[derive(Debug, Clone, Default)]
pub struct NetworkList {
    nets: Vec<IpNet>,
}

impl NetworkList {
    pub fn parse(items: &[String]) -> Result<NetworkList, String> {
        Ok(NetworkList { nets: items.iter().map(|s| parse_network(s)).collect::<Result<_, _>>()? })
    }

    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.nets.iter().any(|n| n.contains(&ip))
    }
}

/// The client's address: the TCP peer, or, when the peer is a trusted
/// proxy, the last address in `X-Forwarded-For` that is not itself a
/// trusted proxy (the left part of that header is client-controlled).
/// None when the server was not started with connect info.
pub fn client_ip<B>(req: &Request<B>, trusted_proxies: &NetworkList) -> Option<IpAddr> {
    let peer = req.extensions().get::<ConnectInfo<SocketAddr>>()?.0.ip().to_canonical();
    if trusted_proxies.is_empty() || !trusted_proxies.contains(peer) {
        return Some(peer);
    }
    let mut client = peer;
    let forwarded = req.headers().get_all("x-forwarded-for").iter().filter_map(|v| v.to_str().ok());
    let hops: Vec<&str> = forwarded.flat_map(|v| v.split(',')).map(str::trim).collect();
    for hop in hops.iter().rev() {
        match hop.parse::<IpAddr>() {
            Ok(ip) => {
                client = ip.to_canonical();
                if !trusted_proxies.contains(client) {
                    break;
                }
            }
            // A garbled entry: stop at the last address we could trust.
            Err(_) => break,
        }
    }
    Some(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(peer: &str, xff: Option<&str>) -> Request<()> {
        let mut req = Request::new(());
        req.extensions_mut().insert(ConnectInfo(peer.parse::<SocketAddr>().unwrap()));
        if let Some(v) = xff {
            req.headers_mut().insert("x-forwarded-for", v.parse().unwrap());
        }
        req
    }

    #[test]
    fn networks() {
        assert_eq!(parse_network("10.1.2.3").unwrap().to_string(), "10.1.2.3/32");
        assert_eq!(parse_network("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(parse_network("2001:db8::/32").unwrap().to_string(), "2001:db8::/32");
        assert!(parse_network("10.0.0.0/33").is_err());
        assert!(parse_network("example.com").is_err());
        let list = NetworkList::parse(&["127.0.0.0/8".into()]).unwrap();
        assert!(list.contains("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!list.contains("10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn forwarded_for_only_from_trusted_proxies() {
        let proxies = NetworkList::parse(&["10.0.0.0/8".into()]).unwrap();
        let ip = |peer, xff| client_ip(&request(peer, xff), &proxies).unwrap().to_string();
        // Not through a proxy: the header is ignored.
        assert_eq!(ip("192.0.2.7:5000", Some("198.51.100.1")), "192.0.2.7");
        // Through one: the rightmost untrusted hop; a forged left part is ignored.
        assert_eq!(ip("10.0.0.2:5000", Some("6.6.6.6, 198.51.100.1, 10.0.0.9")), "198.51.100.1");
        assert_eq!(ip("10.0.0.2:5000", None), "10.0.0.2");
    }
}
