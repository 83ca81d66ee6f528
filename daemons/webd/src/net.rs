//! Who may connect: the box's page is for its own network.

use std::net::IpAddr;

/// Loopback, private (RFC 1918, IPv6 unique-local) and link-local peers;
/// IPv4-mapped IPv6 addresses count as their IPv4 one. Carrier-grade NAT
/// space (100.64/10) is not local: it can hold other customers of the same
/// provider.
pub fn is_local_peer(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_private() || v4.is_link_local(),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_local_peer(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            v6.is_loopback() || (first & 0xfe00) == 0xfc00 || (first & 0xffc0) == 0xfe80
        }
    }
}

/// A client on the box itself: 127.0.0.1 or ::1. Other loopback
/// addresses are the box too, but a client has to choose one on purpose,
/// so they are treated as any other machine (and tests use them as one).
pub fn on_box(ip: IpAddr) -> bool {
    use std::net::{Ipv4Addr, Ipv6Addr};
    match ip {
        IpAddr::V4(v4) => v4 == Ipv4Addr::LOCALHOST,
        IpAddr::V6(v6) => {
            v6 == Ipv6Addr::LOCALHOST || v6.to_ipv4_mapped() == Some(Ipv4Addr::LOCALHOST)
        }
    }
}

/// Whether a request's `Host` header names this box: an IP address,
/// `localhost`, or one of `names` (the box's host name and the names
/// configured), with or without a port.
pub fn is_own_host(host: &str, names: &[String]) -> bool {
    // A port, when there is one, is 1 to 5 digits and nothing else.
    let port_ok =
        |port: &str| (1..=5).contains(&port.len()) && port.bytes().all(|b| b.is_ascii_digit());
    let name = if let Some(rest) = host.strip_prefix('[') {
        // [v6] or [v6]:port, and nothing after
        let Some((ip, after)) = rest.split_once(']') else {
            return false;
        };
        let after_ok = after.is_empty() || after.strip_prefix(':').is_some_and(port_ok);
        return after_ok && ip.parse::<std::net::Ipv6Addr>().is_ok();
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port_ok(port) => name,
            Some(_) => return false,
            None => host,
        }
    };
    let name = name.trim_end_matches('.');
    !name.is_empty()
        && (name.parse::<std::net::Ipv4Addr>().is_ok()
            || name.eq_ignore_ascii_case("localhost")
            || names.iter().any(|n| n.eq_ignore_ascii_case(name)))
}

/// The names the box answers to besides its addresses: its host name,
/// that name under `.local` (mDNS), and `extra`.
pub fn host_names(extra: &[String]) -> Vec<String> {
    let mut names: Vec<String> = extra
        .iter()
        .map(|n| n.trim_end_matches('.').to_string())
        .collect();
    if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let h = h.trim();
        if !h.is_empty() {
            names.push(h.to_string());
            names.push(format!("{h}.local"));
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_and_remote_peers() {
        for local in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.9",
            "192.168.1.20",
            "169.254.3.4",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:192.168.0.2",
        ] {
            assert!(is_local_peer(local.parse().unwrap()), "{local}");
        }
        for remote in [
            "8.8.8.8",
            "172.32.0.1",
            "100.64.0.1",
            "100.128.0.1",
            "2001:db8::1",
            "::ffff:1.1.1.1",
        ] {
            assert!(!is_local_peer(remote.parse().unwrap()), "{remote}");
        }
    }

    #[test]
    fn own_host_names() {
        let names = vec!["pocketos".to_string(), "pocketos.local".to_string()];
        for ok in [
            "192.168.1.5",
            "192.168.1.5:8080",
            "[fe80::1]:80",
            "[::1]",
            "localhost:3000",
            "LOCALHOST",
            "pocketos.local",
            "PocketOS:80",
            "pocketos.local.",
        ] {
            assert!(is_own_host(ok, &names), "{ok}");
        }
        for bad in [
            "",
            "attacker.example",
            "attacker.example:80",
            "localhost.attacker.example",
            "pocketos.local.attacker.example",
            "[not-an-ip]:80",
            "192.168.1.5.nip.io",
            "[::1]evil.example",
            "[::1]:80evil.example",
            "[::1]:",
            "localhost:",
            "localhost:123456",
            "localhost:80:80",
            "[::1]]",
        ] {
            assert!(!is_own_host(bad, &names), "{bad}");
        }
    }
}
