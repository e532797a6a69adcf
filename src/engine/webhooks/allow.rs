//! Which hosts webhooks may be sent to (`--webhook-allow-hosts`), and the checked addresses of a
//! webhook's URL.
//!
//! A webhook URL is chosen by an admin but fetched by the server, from inside its network: without a
//! limit it is a way to make the server POST to anything it can reach (server-side request forgery).
//! The allow-list names what may be reached; the default, `loopback,private`, keeps webhooks inside
//! the host and the private networks.
//!
//! Entries (comma-separated, case-insensitive, blanks ignored):
//! * a CIDR (`10.0.0.0/8`, `fd00::/8`; host bits must be zero) or a single IP (`10.1.2.3`, `::1`);
//! * an exact host name (`game-server.internal`): allowed whatever it resolves to (the operator
//!   vouches for the name and for whoever controls its DNS);
//! * `loopback`: 127.0.0.0/8 and ::1;
//! * `private`: 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 100.64.0.0/10 (carrier-grade NAT, used
//!   by overlay networks) and fc00::/7 (unique local). Link-local addresses (169.254.0.0/16,
//!   fe80::/10) are *not* private here: 169.254.169.254 is the cloud metadata service, the classic
//!   target of request forgery. List them as CIDRs to allow them;
//! * `*`: any address.
//!
//! A host name not listed by name is allowed only if EVERY address it resolves to is allowed, so a
//! name pointing at a public address is refused. The unspecified addresses (0.0.0.0, ::, which reach
//! this host) and multicast and broadcast addresses are never a target, whatever the list says.
//! IPv4-mapped IPv6 addresses (::ffff:a.b.c.d) are judged as the IPv4 address they carry.
//!
//! The addresses [`AllowHosts::resolve_checked`] returns are the only ones delivery may connect to
//! (`deliver.rs` pins them), so a name cannot resolve to an allowed address at the check and to
//! another at the connection (DNS rebinding).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use url::{Host, Url};

/// Longest webhook URL accepted, in bytes.
pub const MAX_URL_LEN: usize = 2048;
/// Longest a host name's resolution may take.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);
/// The list `--webhook-allow-hosts` defaults to.
pub const DEFAULT_ALLOW_HOSTS: &str = "loopback,private";

/// Why a webhook target (or the allow-list itself) is refused. The texts are short, say nothing the
/// admin did not write, and may be stored as a webhook's last error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookTargetError {
    #[error("--webhook-allow-hosts lists no entries (e.g. `loopback,private`)")]
    NoEntries,
    #[error("--webhook-allow-hosts: `{entry}`: {reason}")]
    BadEntry { entry: String, reason: &'static str },
    #[error("the URL is longer than {MAX_URL_LEN} bytes")]
    TooLong,
    #[error("not a URL: {0}")]
    NotAUrl(url::ParseError),
    #[error("only http:// URLs are accepted (the server sends no TLS)")]
    NotHttp,
    #[error("a URL with a user name or password is refused (requests are signed instead)")]
    UserInfo,
    #[error("the URL has no host")]
    NoHost,
    #[error("the URL's port is 0")]
    PortZero,
    #[error("a URL with a #fragment is refused (it is never sent)")]
    Fragment,
    #[error("could not resolve the host name ({0})")]
    Resolve(std::io::ErrorKind),
    #[error("resolving the host name took longer than {} s", RESOLVE_TIMEOUT.as_secs())]
    ResolveTimeout,
    #[error("the host name resolves to no address")]
    NoAddress,
    #[error("{0} is not allowed by --webhook-allow-hosts")]
    NotAllowed(IpAddr),
}

/// The parsed `--webhook-allow-hosts`.
#[derive(Clone, PartialEq, Eq)]
pub struct AllowHosts {
    /// `*` was listed.
    any: bool,
    /// CIDRs, single IPs (as /32, /128) and the keywords' networks, truncated.
    nets: Vec<IpNet>,
    /// Exact host names, lowercase, without a trailing dot.
    names: Vec<String>,
    /// The entries as given (normalised), for `Display`.
    entries: Vec<String>,
}

const LOOPBACK: [IpNet; 2] = [
    IpNet::V4(v4net(Ipv4Addr::new(127, 0, 0, 0), 8)),
    IpNet::V6(v6net(Ipv6Addr::LOCALHOST, 128)),
];

const PRIVATE: [IpNet; 5] = [
    IpNet::V4(v4net(Ipv4Addr::new(10, 0, 0, 0), 8)),
    IpNet::V4(v4net(Ipv4Addr::new(172, 16, 0, 0), 12)),
    IpNet::V4(v4net(Ipv4Addr::new(192, 168, 0, 0), 16)),
    IpNet::V4(v4net(Ipv4Addr::new(100, 64, 0, 0), 10)),
    IpNet::V6(v6net(Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7)),
];

/// A network of the keywords (checked at compile time: a bad prefix length fails the build).
const fn v4net(addr: Ipv4Addr, prefix: u8) -> Ipv4Net {
    Ipv4Net::new_assert(addr, prefix)
}

const fn v6net(addr: Ipv6Addr, prefix: u8) -> Ipv6Net {
    Ipv6Net::new_assert(addr, prefix)
}

impl AllowHosts {
    /// Parses the flag's comma-separated list (see the module's documentation).
    pub fn parse(text: &str) -> Result<AllowHosts, WebhookTargetError> {
        let mut allow = AllowHosts {
            any: false,
            nets: Vec::new(),
            names: Vec::new(),
            entries: Vec::new(),
        };
        for raw in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let entry = raw.to_ascii_lowercase();
            let bad = |reason| WebhookTargetError::BadEntry {
                entry: raw.chars().take(100).collect(),
                reason,
            };
            match entry.as_str() {
                "*" => allow.any = true,
                "loopback" => allow.nets.extend(LOOPBACK),
                "private" => allow.nets.extend(PRIVATE),
                _ if entry.contains('/') => {
                    let net = IpNet::from_str(&entry).map_err(|_| bad("not a CIDR"))?;
                    if net.trunc() != net {
                        return Err(bad(
                            "has host bits set (write the network's first address, e.g. 10.0.0.0/8)",
                        ));
                    }
                    allow.nets.push(net);
                }
                _ => {
                    let unbracketed = entry
                        .strip_prefix('[')
                        .and_then(|e| e.strip_suffix(']'))
                        .unwrap_or(&entry);
                    if let Ok(ip) = IpAddr::from_str(unbracketed) {
                        allow.nets.push(IpNet::from(canonical(ip)));
                    } else if entry.contains(':') {
                        return Err(bad("is neither an IP address nor a host name"));
                    } else {
                        let name = entry.strip_suffix('.').unwrap_or(&entry);
                        check_host_name(name).map_err(bad)?;
                        allow.names.push(name.to_owned());
                    }
                }
            }
            allow.entries.push(entry);
        }
        if allow.entries.is_empty() {
            return Err(WebhookTargetError::NoEntries);
        }
        Ok(allow)
    }

    /// Whether the address is allowed by a CIDR, IP or keyword (names aside).
    pub fn allows_ip(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        never_a_target(ip).is_none() && (self.any || self.nets.iter().any(|net| net.contains(&ip)))
    }

    /// Whether the host name is listed by name.
    pub fn allows_name(&self, name: &str) -> bool {
        self.any || {
            let name = name.strip_suffix('.').unwrap_or(name);
            self.names.iter().any(|n| n.eq_ignore_ascii_case(name))
        }
    }

    /// What the `PUT` can check without resolving: the URL's shape and, when its host is an IP
    /// address, the allow-list. A host name is checked at each delivery ([`Self::resolve_checked`]).
    pub fn check_url(&self, url: &str) -> Result<Url, WebhookTargetError> {
        let url = check_url_shape(url)?;
        if let Some(ip) = literal_ip(&url) {
            if !self.allows_ip(ip) {
                return Err(WebhookTargetError::NotAllowed(canonical(ip)));
            }
        }
        Ok(url)
    }

    /// The addresses delivery may connect to for `url`: its shape checked, its host resolved (within
    /// [`RESOLVE_TIMEOUT`]), and the result returned only if the host is allowed by name or every
    /// resolved address is allowed. Never empty.
    pub async fn resolve_checked(&self, url: &str) -> Result<Vec<SocketAddr>, WebhookTargetError> {
        let url = check_url_shape(url)?;
        let port = url.port_or_known_default().unwrap_or(80);
        if let Some(ip) = literal_ip(&url) {
            return if self.allows_ip(ip) {
                Ok(vec![SocketAddr::new(canonical(ip), port)])
            } else {
                Err(WebhookTargetError::NotAllowed(canonical(ip)))
            };
        }
        let name = match url.host() {
            Some(Host::Domain(name)) => name.strip_suffix('.').unwrap_or(name),
            _ => return Err(WebhookTargetError::NoHost),
        };
        let resolved = tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((name, port)))
            .await
            .map_err(|_| WebhookTargetError::ResolveTimeout)?
            .map_err(|e| WebhookTargetError::Resolve(e.kind()))?;
        let mut addrs: Vec<SocketAddr> = Vec::new();
        for addr in resolved {
            let addr = SocketAddr::new(canonical(addr.ip()), addr.port());
            if !addrs.contains(&addr) {
                addrs.push(addr);
            }
        }
        if addrs.is_empty() {
            return Err(WebhookTargetError::NoAddress);
        }
        let by_name = self.allows_name(name);
        for addr in &addrs {
            let ip = addr.ip();
            let allowed = if by_name {
                never_a_target(ip).is_none()
            } else {
                self.allows_ip(ip)
            };
            if !allowed {
                return Err(WebhookTargetError::NotAllowed(ip));
            }
        }
        Ok(addrs)
    }
}

impl Default for AllowHosts {
    fn default() -> AllowHosts {
        AllowHosts::parse(DEFAULT_ALLOW_HOSTS)
            .unwrap_or_else(|_| unreachable!("the default list parses"))
    }
}

impl FromStr for AllowHosts {
    type Err = WebhookTargetError;
    fn from_str(text: &str) -> Result<AllowHosts, WebhookTargetError> {
        AllowHosts::parse(text)
    }
}

impl fmt::Display for AllowHosts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.entries.join(","))
    }
}

impl fmt::Debug for AllowHosts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AllowHosts({self})")
    }
}

/// The checks of a webhook URL that need no allow-list and no DNS (the `PUT`'s validation): at most
/// [`MAX_URL_LEN`] bytes, `http://`, a host, no user name or password, no port 0, no fragment.
pub fn check_url_shape(url: &str) -> Result<Url, WebhookTargetError> {
    if url.len() > MAX_URL_LEN {
        return Err(WebhookTargetError::TooLong);
    }
    let parsed = Url::parse(url).map_err(WebhookTargetError::NotAUrl)?;
    if parsed.scheme() != "http" {
        return Err(WebhookTargetError::NotHttp);
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(WebhookTargetError::UserInfo);
    }
    match parsed.host() {
        None => return Err(WebhookTargetError::NoHost),
        Some(Host::Domain(name)) if name.is_empty() || name == "." => {
            return Err(WebhookTargetError::NoHost);
        }
        Some(_) => {}
    }
    if parsed.port() == Some(0) {
        return Err(WebhookTargetError::PortZero);
    }
    if parsed.fragment().is_some() {
        return Err(WebhookTargetError::Fragment);
    }
    Ok(parsed)
}

/// The URL's host when it is an IP address (the URL parser has already turned `0x7f.1` and the like
/// into one).
fn literal_ip(url: &Url) -> Option<IpAddr> {
    match url.host() {
        Some(Host::Ipv4(ip)) => Some(IpAddr::V4(ip)),
        Some(Host::Ipv6(ip)) => Some(IpAddr::V6(ip)),
        _ => None,
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it carries; others unchanged.
fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// Why the address is never a webhook target, if it is not.
fn never_a_target(ip: IpAddr) -> Option<&'static str> {
    let broadcast = matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
    (ip.is_unspecified() || ip.is_multicast() || broadcast).then_some("not a unicast address")
}

/// A host name of letters, digits, `-` and `_` labels (1–63 characters, no leading or trailing `-`),
/// at most 253 characters.
fn check_host_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > 253 {
        return Err("is not a host name (1 to 253 characters)");
    }
    for label in name.split('.') {
        let valid = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid {
            return Err("is not a CIDR, an IP address, a host name, `loopback`, `private` or `*`");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn the_default_is_loopback_and_private() {
        let allow = AllowHosts::default();
        assert_eq!(allow.to_string(), "loopback,private");
        for yes in [
            "127.0.0.1",
            "127.255.0.9",
            "::1",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.254",
            "192.168.1.1",
            "100.64.0.1",
            "100.127.255.1",
            "fd12::1",
            "fc00::1",
            "::ffff:10.0.0.1",
            "::ffff:127.0.0.1",
        ] {
            assert!(allow.allows_ip(ip(yes)), "{yes} should be allowed");
        }
        for no in [
            "8.8.8.8",
            "172.32.0.1",
            "192.169.0.1",
            "100.128.0.1",
            "169.254.169.254",
            "fe80::1",
            "2001:db8::1",
            "::ffff:8.8.8.8",
            "0.0.0.0",
            "::",
            "224.0.0.1",
            "255.255.255.255",
        ] {
            assert!(!allow.allows_ip(ip(no)), "{no} should be refused");
        }
    }

    #[test]
    fn cidrs_and_single_addresses() {
        let allow =
            AllowHosts::parse(" 203.0.113.0/24 , 198.51.100.7, 2001:db8::/32, [2001:db9::5] ")
                .unwrap();
        assert!(allow.allows_ip(ip("203.0.113.200")));
        assert!(!allow.allows_ip(ip("203.0.114.1")));
        assert!(allow.allows_ip(ip("198.51.100.7")));
        assert!(!allow.allows_ip(ip("198.51.100.8")));
        assert!(allow.allows_ip(ip("2001:db8:ffff::1")));
        assert!(allow.allows_ip(ip("2001:db9::5")));
        assert!(!allow.allows_ip(ip("2001:db9::6")));
        assert!(!allow.allows_ip(ip("127.0.0.1")), "loopback is not implied");
        assert!(!allow.allows_ip(ip("10.0.0.1")), "private is not implied");
    }

    #[test]
    fn names_and_star() {
        let allow = AllowHosts::parse("Game-Server.internal.,loopback").unwrap();
        assert!(allow.allows_name("game-server.internal"));
        assert!(allow.allows_name("GAME-SERVER.internal."));
        assert!(!allow.allows_name("evil.game-server.internal"));
        assert!(!allow.allows_name("server.internal"));
        let any = AllowHosts::parse("*").unwrap();
        assert!(any.allows_name("anything.example"));
        assert!(any.allows_ip(ip("8.8.8.8")));
        assert!(any.allows_ip(ip("2001:db8::1")));
        assert!(
            !any.allows_ip(ip("0.0.0.0")),
            "never a target, even under *"
        );
    }

    #[test]
    fn bad_entries_are_refused() {
        assert_eq!(AllowHosts::parse(""), Err(WebhookTargetError::NoEntries));
        assert_eq!(
            AllowHosts::parse(" , ,"),
            Err(WebhookTargetError::NoEntries)
        );
        for bad in [
            "10.0.0.1/8",
            "10.0.0.0/33",
            "10.0.0/8",
            "::1/129",
            "fe80::1::2",
            "bad host",
            "under*score",
            "*.example.com",
            "-lead.example",
            "a..b",
            "http://host",
            "host:8080",
        ] {
            let err = AllowHosts::parse(&format!("loopback,{bad}")).unwrap_err();
            assert!(
                matches!(err, WebhookTargetError::BadEntry { .. }),
                "{bad}: {err:?}"
            );
        }
        assert!(AllowHosts::parse(&"a".repeat(64)).is_err());
        assert!(AllowHosts::parse(&["a"; 130].join(".")).is_err());
    }

    #[test]
    fn url_shapes() {
        for good in [
            "http://game-server.internal/shop-events",
            "http://10.0.0.1:8080/x?y=1",
            "http://[::1]:9000/",
            "HTTP://Localhost",
        ] {
            assert!(check_url_shape(good).is_ok(), "{good}");
        }
        let cases = [
            ("https://example.com/", WebhookTargetError::NotHttp),
            ("ftp://example.com/", WebhookTargetError::NotHttp),
            ("http://user:pw@example.com/", WebhookTargetError::UserInfo),
            ("http://user@example.com/", WebhookTargetError::UserInfo),
            ("http://example.com:0/", WebhookTargetError::PortZero),
            ("http://example.com/#frag", WebhookTargetError::Fragment),
        ];
        for (url, expected) in cases {
            assert_eq!(check_url_shape(url).unwrap_err(), expected, "{url}");
        }
        assert!(matches!(
            check_url_shape("http://:8080/path"),
            Err(WebhookTargetError::NotAUrl(_) | WebhookTargetError::NoHost)
        ));
        assert!(matches!(
            check_url_shape("not a url"),
            Err(WebhookTargetError::NotAUrl(_))
        ));
        let long = format!("http://example.com/{}", "a".repeat(MAX_URL_LEN));
        assert_eq!(
            check_url_shape(&long).unwrap_err(),
            WebhookTargetError::TooLong
        );
        let at_limit = format!("http://example.com/{}", "a".repeat(MAX_URL_LEN - 19));
        assert_eq!(at_limit.len(), MAX_URL_LEN);
        assert!(check_url_shape(&at_limit).is_ok());
    }

    #[test]
    fn check_url_judges_literal_addresses_only() {
        let allow = AllowHosts::default();
        assert!(allow.check_url("http://10.0.0.1/").is_ok());
        assert_eq!(
            allow.check_url("http://8.8.8.8/").unwrap_err(),
            WebhookTargetError::NotAllowed(ip("8.8.8.8"))
        );
        // The URL parser turns the odd spellings of an address into the address.
        assert_eq!(
            allow.check_url("http://0x8.8.8.8/").unwrap_err(),
            WebhookTargetError::NotAllowed(ip("8.8.8.8"))
        );
        assert_eq!(
            allow.check_url("http://[::ffff:8.8.8.8]/").unwrap_err(),
            WebhookTargetError::NotAllowed(ip("8.8.8.8"))
        );
        assert!(
            allow.check_url("http://public.example/").is_ok(),
            "names wait for delivery"
        );
    }

    #[tokio::test]
    async fn literal_addresses_resolve_to_themselves() {
        let allow = AllowHosts::default();
        assert_eq!(
            allow
                .resolve_checked("http://10.0.0.1:8080/x")
                .await
                .unwrap(),
            vec!["10.0.0.1:8080".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(
            allow.resolve_checked("http://[::1]/").await.unwrap(),
            vec!["[::1]:80".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(
            allow
                .resolve_checked("http://[fe80::1]/")
                .await
                .unwrap_err(),
            WebhookTargetError::NotAllowed(ip("fe80::1"))
        );
        assert_eq!(
            allow
                .resolve_checked("http://0.0.0.0:8080/")
                .await
                .unwrap_err(),
            WebhookTargetError::NotAllowed(ip("0.0.0.0"))
        );
        let link_local = AllowHosts::parse("169.254.0.0/16").unwrap();
        assert!(
            link_local
                .resolve_checked("http://169.254.1.1/")
                .await
                .is_ok()
        );
    }

    #[tokio::test]
    async fn a_name_is_judged_by_every_address_it_resolves_to() {
        // `localhost` resolves to loopback addresses only.
        let loopback = AllowHosts::parse("loopback").unwrap();
        let addrs = loopback
            .resolve_checked("http://localhost:9/")
            .await
            .unwrap();
        assert!(!addrs.is_empty());
        assert!(addrs.iter().all(|a| a.ip().is_loopback() && a.port() == 9));

        let private = AllowHosts::parse("private").unwrap();
        let err = private
            .resolve_checked("http://localhost:9/")
            .await
            .unwrap_err();
        assert!(
            matches!(err, WebhookTargetError::NotAllowed(ip) if ip.is_loopback()),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .ends_with("is not allowed by --webhook-allow-hosts")
        );

        // Listed by name: allowed whatever it resolves to.
        let by_name = AllowHosts::parse("private,LOCALHOST").unwrap();
        assert!(by_name.resolve_checked("http://localhost:9/").await.is_ok());
        assert!(
            by_name
                .resolve_checked("http://localhost.:9/")
                .await
                .is_ok()
        );
    }

    #[tokio::test]
    async fn unresolvable_names_are_refused() {
        let allow = AllowHosts::parse("*").unwrap();
        let err = allow
            .resolve_checked("http://no-such-host.invalid/")
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                WebhookTargetError::Resolve(_)
                    | WebhookTargetError::ResolveTimeout
                    | WebhookTargetError::NoAddress
            ),
            "{err:?}"
        );
    }

    #[test]
    fn errors_are_short() {
        let long_entry = format!("{}!", "x".repeat(500));
        let err = AllowHosts::parse(&long_entry).unwrap_err();
        assert!(err.to_string().len() <= 200, "{err}");
    }
}
